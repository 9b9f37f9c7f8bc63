"""The classes users subclass: :class:`Worker` and :class:`SafeWorker`.

This module is imported by every worker process, so it stays light.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

__all__ = ["SafeWorker", "Worker", "WorkerFactory"]


def _unattached(value: Any) -> None:
    raise RuntimeError(
        "put_result() was called on a worker that no pool is running; "
        "only a worker started by a looppool pool can send results"
    )


class Worker:
    """Base class of a pool's workers; subclass it and override the hooks.

    Each hook may be a plain method or a coroutine method; all of them run on
    the worker process's event loop:

    * :meth:`initialise` — once, before the first message.
    * :meth:`process_message` — for every message; many run concurrently, up
      to the pool's ``concurrency``. Its return value is the reply that
      ``Pool.submit()`` returns; :meth:`put_result` sends results to
      ``Pool.results()`` (zero or more per message).
    * :meth:`finalise` — once, when the pool stops.

    Before :meth:`initialise` runs, the pool sets :attr:`number` (``0`` to
    ``size - 1``). The constructor is the user's own: it need not call
    ``super().__init__()``.

    When the pool stops, a ``Worker`` stops taking messages, cancels the ones
    in flight (``CancelledError`` is raised inside :meth:`process_message`, so
    ``finally`` blocks run) and exits promptly. Use :class:`SafeWorker` when
    every message must be processed.
    """

    #: The worker's number, ``0`` to ``size - 1``; set by the pool.
    number: int = -1

    #: Whether a stop processes every message accepted before it.
    safe: ClassVar[bool] = False

    # Set by the runtime that hosts the worker (a worker process, or InlinePool).
    _looppool_sink: Callable[[Any], None] = staticmethod(_unattached)

    def initialise(self) -> Awaitable[None] | None:
        """Prepare the worker (open clients, load tables); may be ``async``."""
        return None

    def process_message(self, message: Any) -> Any:
        """Process one message; may be ``async``. Must be overridden."""
        raise NotImplementedError(
            f"{type(self).__qualname__} must override process_message(self, message)"
        )

    def finalise(self) -> Awaitable[None] | None:
        """Release what :meth:`initialise` acquired; may be ``async``."""
        return None

    def put_result(self, value: Any) -> None:
        """Send one result to the parent's ``results()`` (or ``on_result``).

        Never blocks. The value is pickled at once, so a value that cannot be
        pickled raises here, inside :meth:`process_message`.
        """
        self._looppool_sink(value)

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} number={self.number}>"


class SafeWorker(Worker):
    """A :class:`Worker` whose stop loses nothing.

    On ``Pool.stop()``, every message put before the stop is processed, and
    its results delivered, before the workers run :meth:`finalise` and exit.
    If a ``SafeWorker`` process dies, the messages it held run again until
    they finish (at least once); only a poison message, the only message in
    two workers that died, fails with :class:`~looppool.WorkerLost`.
    """

    safe: ClassVar[bool] = True


#: What ``Pool`` accepts as its worker: a ``Worker`` subclass, or any
#: picklable zero-argument callable returning a ``Worker`` (``functools.partial``).
WorkerFactory = Callable[[], Worker]
