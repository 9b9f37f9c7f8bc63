"""Faulty objects and workers for test_faults.py: a module of its own so that spawned workers can
import it.

A :class:`Fault` says how to fail — raise, exit (``sys.exit``) or crash (``os._exit``, SIGKILL of
itself, a segfault) — and :meth:`Fault.fire` does it. :class:`Faulty` values and
:class:`FaultyError` exceptions fire a fault while they are pickled or unpickled. A fault with a
``token`` fires once: the process that removes the token file fires it, later ones do nothing, so
a message that crashed its worker runs normally when a ``SafeWorker`` pool delivers it again.
"""

from __future__ import annotations

import asyncio
import ctypes
import faulthandler
import multiprocessing
import os
import resource
import signal
import sys
from dataclasses import dataclass
from typing import Any

import looppool

#: The exit code of ``sys.exit`` faults.
EXIT_CODE = 7
#: The exit code of ``os._exit`` crashes.
CRASH_CODE = 13

#: Every way a fault can end a process, and the exit code multiprocessing reports for it.
EXIT_CODES = {
    "exit": EXIT_CODE,
    "_exit": CRASH_CODE,
    "sigkill": -signal.SIGKILL,
    "segv": -signal.SIGSEGV,
}
CRASHES = ("_exit", "sigkill", "segv")
#: A survivor's value: what a spent fault's message, result or reply turns into.
SURVIVED = "survived"


class InjectedFault(Exception):
    """The exception a ``raise`` fault raises."""


def in_pool_parent() -> bool:
    """Whether this process is the pool's parent (not a multiprocessing child)."""
    return multiprocessing.parent_process() is None


@dataclass(frozen=True)
class Fault:
    """How to fail, when :meth:`fire` is called.

    ``kind``: ``"raise"``, ``"exit"``, or a crash: ``"_exit"``, ``"sigkill"``, ``"segv"``.
    ``token``: a file path; if set, the fault fires only in the process that removes that file
    (once). ``where``: ``"anywhere"``, or ``"parent"`` to fire only in the pool's parent.
    """

    kind: str
    token: str | None = None
    where: str = "anywhere"

    def fire(self, site: str) -> None:
        """Fail now as ``kind`` says (unless spent, or not in the right process)."""
        if self.where == "parent" and not in_pool_parent():
            return
        if self.token is not None:
            try:
                os.unlink(self.token)
            except FileNotFoundError:
                return  # spent: another process (or an earlier delivery) fired it
        if self.kind == "raise":
            raise InjectedFault(f"fault injected while {site}")
        if self.kind == "hang":
            # A loop blocked for ever in C (the pool's hang_timeout ends it).
            import time

            time.sleep(10**6)
        if self.kind == "exit":
            sys.exit(EXIT_CODE)
        if self.kind == "_exit":
            os._exit(CRASH_CODE)
        if self.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "segv":
            # As CPython's test_deadlock does: no faulthandler dump, a plain SIGSEGV; and no
            # core file, wherever the tests run.
            faulthandler.disable()
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            ctypes.string_at(0)
        raise AssertionError(f"fault {self.kind!r} did not end the process")


def _same(value: Any) -> Any:
    return value


def _unpickle_faulty(fault: Fault, value: Any) -> Any:
    fault.fire("unpickling a value")
    return value


class Faulty:
    """A value that fires ``fault`` while it is pickled (``at="pickle"``) or unpickled.

    A spent fault lets it travel as ``value`` instead.
    """

    def __init__(self, at: str, fault: Fault, value: Any = SURVIVED) -> None:
        self.at = at
        self.fault = fault
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        if self.at == "pickle":
            self.fault.fire("pickling a value")
            return (_same, (self.value,))
        return (_unpickle_faulty, (self.fault, self.value))


def _unpickle_error(fault: Fault) -> FaultyError:
    fault.fire("unpickling an exception")
    return FaultyError("nothing", None)


class FaultyError(Exception):
    """An exception whose pickling (``at="pickle"``) or unpickling fires ``fault``.

    A spent fault (or ``at="nothing"``) lets it travel as a plain ``FaultyError``.
    """

    def __init__(self, at: str, fault: Fault | None) -> None:
        super().__init__(f"an exception whose {at} is faulty")
        self.at = at
        self.fault = fault

    def __reduce__(self) -> tuple[Any, ...]:
        if self.at == "unpickle" and self.fault is not None:
            return (_unpickle_error, (self.fault,))
        if self.at == "pickle" and self.fault is not None:
            self.fault.fire("pickling an exception")
        return (FaultyError, ("nothing", None))


def _print_tasks() -> None:
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


class Faults(looppool.Worker):
    """Runs the catalogue's messages: each tuple names what to do and how it fails.

    Messages (``style`` is ``"sync"`` to run inline, ``"async"`` to run as a task):

    * ``("echo", tag)``: put ``(number, tag)`` as a result, reply ``tag``.
    * ``("pid",)``: reply with the process id.
    * ``("inject", fault, style)``: fire ``fault`` in ``process_message``.
    * ``("result", at, fault, style)``: put a result whose pickling/unpickling fires ``fault``.
    * ``("reply", at, fault, style)``: reply with a value whose pickling/unpickling fires it.
    * ``("raise", at, fault, style)``: raise a :class:`FaultyError`.
    * ``("arm-finalise", fault)``: fire ``fault`` in ``finalise()``.
    * ``("hold", gate, tag)``: put ``(number, "holding")``, wait for the gate, echo ``tag``.

    ``initialise()`` and ``finalise()`` can fire a fault, and hold (once) at a gate.

    A message that survives its fault (spent) puts ``(number, "survived")`` and replies
    ``"survived"``.
    """

    def __init__(
        self,
        init_fault: Fault | None = None,
        init_worker: int | None = None,
        holds: dict[str, tuple[Any, str]] | None = None,
        hold_worker: int | None = None,
    ) -> None:
        # Called in the worker process, on its loop. When a test hangs, SIGUSR1 makes the worker
        # print every thread's stack, and SIGUSR2 every task's, to stderr (pytest captures it).
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, _print_tasks)
        self.init_fault = init_fault
        self.init_worker = init_worker
        self.holds = holds or {}
        self.hold_worker = hold_worker
        self.final_fault: Fault | None = None

    async def initialise(self) -> None:
        """Fire ``init_fault`` in worker ``init_worker`` (in every worker if None)."""
        if self.init_fault is not None and self.init_worker in (None, self.number):
            self.init_fault.fire(f"initialising worker {self.number}")
        await self._hold_in("initialise")

    async def finalise(self) -> None:
        """Fire the fault armed by an ``arm-finalise`` message."""
        if self.final_fault is not None:
            self.final_fault.fire(f"finalising worker {self.number}")
        await self._hold_in("finalise")

    async def _hold_in(self, hook: str) -> None:
        """In worker ``hold_worker``, wait in ``hook`` for the gate ``holds[hook]`` names, once:
        if its token file is there. Put ``(number, "holding in <hook>")`` first."""
        if hook not in self.holds or self.number != self.hold_worker:
            return
        gate, token = self.holds[hook]
        try:
            os.unlink(token)
        except FileNotFoundError:
            return
        self.put_result((self.number, f"holding in {hook}"))
        await gate.wait()

    def process_message(self, message: Any) -> Any:
        op, *args = message
        if op == "echo":
            return self._echo(args[0])
        if op == "pid":
            return os.getpid()
        if op == "arm-finalise":
            self.final_fault = args[0]
            return "armed"
        if op == "stall":
            return self._stall()
        if op == "hold":
            return self._hold(*args)
        handler = {
            "inject": self._inject,
            "result": self._result,
            "reply": self._reply,
            "raise": self._raise,
        }[op]
        *params, style = args
        if style == "async":
            return self._in_task(handler, *params)
        return handler(*params)

    async def _in_task(self, handler: Any, *params: Any) -> Any:
        await asyncio.sleep(0)  # really suspend: the rest runs in a task, not inline
        return handler(*params)

    def _echo(self, tag: Any) -> Any:
        self.put_result((self.number, tag))
        return tag

    async def _stall(self) -> Any:
        await asyncio.sleep(3600)  # never returns in time: its deadline cancels it
        return SURVIVED

    def _inject(self, fault: Fault) -> Any:
        fault.fire("processing a message")
        return self._echo(SURVIVED)

    def _result(self, at: str, fault: Fault) -> Any:
        self.put_result(Faulty(at, fault, (self.number, SURVIVED)))
        return SURVIVED

    def _reply(self, at: str, fault: Fault) -> Any:
        return Faulty(at, fault)

    def _raise(self, at: str, fault: Fault) -> Any:
        raise FaultyError(at, fault)

    async def _hold(self, gate: Any, tag: Any) -> Any:
        self.put_result((self.number, "holding"))
        await gate.wait()
        return self._echo(tag)


class FaultWorker(Faults):
    """The catalogue's worker as a plain ``looppool.Worker``: a death fails what it held."""


class SafeFaultWorker(Faults, looppool.SafeWorker):
    """The catalogue's worker as a ``looppool.SafeWorker``: a death re-delivers what it held."""
