"""How shared messages reach the workers: the interface, and its default (fair rounds).

In the default distribution the ledger deals every shared message to a
worker in fair rounds (``Ledger.next_in_round``) and this class does
nothing. Barrier mode (``_barrier``) overrides it: shared messages go to one
queue the workers take from, and a worker's death restarts every worker.

The pool calls these at fixed points of its life; each says when.
"""

from __future__ import annotations

from typing import Any

from ._ledger import Msg, SharedPlace, Slot

__all__ = ["Distribution"]


class Distribution(SharedPlace):
    """Fair rounds: every shared message is dealt by the ledger; nothing to do here."""

    def start(self) -> None:
        """Before the first worker starts: make what the workers share."""

    def worker_options(self) -> dict[str, Any]:
        """What each worker process needs of the distribution (see ``ChildConfig``)."""
        return {}

    def taken(self, slot: Slot, mid: int) -> None:
        """A worker reported that it took message ``mid`` from the shared queue."""

    def find(self, mid: int) -> Msg | None:
        """A message ended that no slot held: the shared one with that id, if any."""
        return None

    def resend_cancelled(self, slot: Slot, msg: Msg) -> bool:
        """A stopping worker cancelled ``msg``: True if it is to be sent again instead."""
        return False

    def worker_died(self, slot: Slot) -> None:
        """A worker died, before its messages are rescued."""

    def worker_ended(self, slot: Slot) -> bool:
        """A worker ended (died, or stopped when told). True if this replaces it, not the pool."""
        return False

    def withdraw(self, msg: Msg) -> None:
        """A shared message's submit() was cancelled and the ledger does not hold it."""

    def retire(self, slot: Slot) -> bool:
        """Recycle ``slot``'s worker; True if this does it (the pool then does nothing)."""
        return False

    def isolation_over(self) -> None:
        """The last suspect group of a death finished: messages may flow as usual again."""

    def close(self) -> list[Msg]:
        """The pool stops: release what the workers shared; return the messages never taken."""
        return []
