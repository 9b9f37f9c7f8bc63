"""The classes users subclass: :class:`Worker` and :class:`SafeWorker`.

This module is imported by every worker process, so it stays light.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Final, Generic

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:  # TypeVar(default=...) (PEP 696) is in typing from 3.13
    from typing_extensions import TypeVar

__all__ = [
    "HookNameWarning",
    "MessageT",
    "ReplyT",
    "ResultT",
    "SafeWorker",
    "Worker",
    "WorkerFactory",
]

# A worker's types: what process_message takes, what it returns (submit()'s
# reply) and what put_result sends (what results() yields). Unsaid, each is
# Any, so `class W(looppool.Worker)` passes mypy --strict as it is.
MessageT = TypeVar("MessageT", default=Any)
ReplyT = TypeVar("ReplyT", default=Any)
ResultT = TypeVar("ResultT", default=Any)

#: The hooks the runtime calls, by name (British spelling).
HOOKS: Final = ("initialise", "process_message", "finalise")

#: Names other libraries and habits give a message handler. Spelling slips
#: (``initialize``, ``processMessage``, ``process_messages``) are found by
#: similarity instead (:func:`_near_miss`).
_HOOK_ALIASES: Final = {
    "on_message": "process_message",
    "handle_message": "process_message",
    "process_msg": "process_message",
}

#: How alike (``difflib`` ratio, on names lower-cased without underscores) a
#: name must be to a hook's to count as a slip: ``initialize`` is 0.9 from
#: ``initialise``, ``finalize`` 0.875 from ``finalise``.
_NEAR_MISS_RATIO: Final = 0.85
#: ... and at most this many letters longer or shorter: ``initialise_db``
#: (two more) is a helper, ``process_messages`` (one more) a slip.
_NEAR_MISS_LENGTH: Final = 1


class HookNameWarning(UserWarning):
    """A :class:`Worker` subclass defines a method whose name is a near miss of a hook.

    For example ``initialize`` (the hooks are spelt ``initialise`` and
    ``finalise``) or ``processMessage``: the pool never calls it. Issued when
    the class is defined, and only if the hook itself is not defined.
    """


def _squash(name: str) -> str:
    return name.lower().replace("_", "")


def _near_miss(name: str) -> str | None:
    """The hook that ``name`` looks like a slip for, or ``None``."""
    if name in HOOKS or name.startswith("_"):  # private helpers are the user's own
        return None
    alias = _HOOK_ALIASES.get(name)
    if alias is not None:
        return alias
    import difflib  # here: most classes never get this far, and workers import this module

    squashed = _squash(name)
    for hook in HOOKS:
        target = _squash(hook)
        if (
            abs(len(squashed) - len(target)) <= _NEAR_MISS_LENGTH
            and difflib.SequenceMatcher(None, squashed, target).ratio() >= _NEAR_MISS_RATIO
        ):
            return hook
    return None


def _in_a_child_process() -> bool:
    """Whether this is a ``multiprocessing`` child, or one still being bootstrapped.

    A worker process started by "spawn" or "forkserver" imports the user's
    modules again: the parent, which holds the worker class to start the
    pool, has warned once already. While a child unpickles what its parent
    sent (the worker class's module, the main script as ``__mp_main__``),
    ``parent_process()`` is still ``None``; multiprocessing marks that phase
    with ``current_process()._inheriting`` (its own check against starting
    processes from an unguarded main module reads the same flag).
    """
    import multiprocessing

    return (
        getattr(multiprocessing.current_process(), "_inheriting", False)
        or multiprocessing.parent_process() is not None
    )


def _warn_about_near_misses(cls: type[Worker]) -> None:
    """Warn, at the misspelt ``def``, for each method of ``cls`` that looks like a hook."""
    for name, value in vars(cls).items():
        if not inspect.isfunction(value):
            continue
        hook = _near_miss(name)
        if hook is None or getattr(cls, hook) is not getattr(Worker, hook):
            continue  # not a near miss, or the hook is defined too (here or in a base)
        if _in_a_child_process():
            return
        code = value.__code__
        warnings.warn_explicit(
            f"{cls.__qualname__}.{name}() looks like a misspelling of the hook "
            f"{hook}(): looppool calls {hook}() and never {name}(). Rename it to "
            f"{hook} (the hooks are initialise, process_message and finalise, "
            "with British spellings).",
            HookNameWarning,
            code.co_filename,
            code.co_firstlineno,
            module=cls.__module__,
        )


async def _no_wait() -> None:
    return None


def _unattached(value: Any) -> None:
    raise RuntimeError(
        "put_result() was called on a worker that no pool is running; "
        "only a worker started by a looppool pool can send results"
    )


class Worker(Generic[MessageT, ReplyT, ResultT]):
    """Base class of a pool's workers; subclass it and override the hooks.

    ``Worker[Message, Reply, Result]`` says what the worker takes and sends:
    a pool of it types ``put``/``submit``'s message, ``submit``'s reply and
    what ``results()`` yields accordingly (each is ``Any`` when unsaid)::

        class Fetch(looppool.SafeWorker[str, int, tuple[str, int]]):
            async def process_message(self, url: str) -> int: ...

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

    A subclass that defines a near miss of a hook's name (``initialize``,
    ``finalize``, ``processMessage``, ``process_messages``, ``on_message``...)
    and not the hook itself gets a :class:`HookNameWarning` where it is
    defined: the pool would never call that method.
    """

    #: The worker's number, ``0`` to ``size - 1``; set by the pool.
    number: int = -1

    #: Whether a stop processes every message accepted before it.
    safe: ClassVar[bool] = False

    # Set by the runtime that hosts the worker (a worker process, or InlinePool).
    _looppool_sink: Callable[[Any], None] = staticmethod(_unattached)
    _looppool_room: Callable[[], Awaitable[None]] = staticmethod(_no_wait)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A hook spelt otherwise (initialize, processMessage) is silently
        # never called: say so where the class is defined.
        _warn_about_near_misses(cls)

    def initialise(self) -> Awaitable[None] | None:
        """Prepare the worker (open clients, load tables); may be ``async``."""
        return None

    def process_message(self, message: MessageT) -> ReplyT | Awaitable[ReplyT]:
        """Process one message; may be ``async``. Must be overridden."""
        raise NotImplementedError(
            f"{type(self).__qualname__} must override process_message(self, message)"
        )

    def finalise(self) -> Awaitable[None] | None:
        """Release what :meth:`initialise` acquired; may be ``async``."""
        return None

    def put_result(self, value: ResultT) -> None:
        """Send one result to the parent's ``results()`` (or ``on_result``).

        Never blocks. The value is pickled at once, so a value that cannot be
        pickled raises here, inside :meth:`process_message`.
        """
        self._looppool_sink(value)

    async def put_result_wait(self, value: ResultT) -> None:
        """Send one result, then wait while the parent is behind in reading them.

        Like :meth:`put_result`, then, if more than a few megabytes of this
        worker's results wait for the parent (whose ``results()`` consumer is
        slower than the workers, see ``Pool(max_results=...)``), wait until
        they have gone. A handler that puts many results per message should
        use it, so that its memory stays bounded; ``put_result`` never waits.
        (A worker also starts no new message while it is that far behind.)
        """
        self._looppool_sink(value)
        await self._looppool_room()

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} number={self.number}>"


class SafeWorker(Worker[MessageT, ReplyT, ResultT]):
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
