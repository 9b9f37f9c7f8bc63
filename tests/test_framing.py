"""The wire between a worker and the parent: how the worker's outbox folds events into frames."""

from __future__ import annotations

import asyncio
import os
import pickle
from typing import Any

from looppool import _protocol as P
from looppool._child import Outbox


def _frames(fd: int) -> list[list[tuple[Any, ...]]]:
    decoder = P.FrameDecoder()
    frames = decoder.read(fd)
    assert frames is not None
    return frames


async def test_outbox_folds_results_and_acks_and_keeps_every_other_order() -> None:
    """Runs of results and plain acks become one item each; nothing else moves.

    A message's results still precede its ack, and a log record, a failure's
    EV_DONE, a reply and EV_BYE still follow the acks added before them.
    """
    r, w = os.pipe()
    os.set_blocking(r, False)
    out = Outbox(w)
    out.attach(asyncio.get_running_loop())
    try:
        out.add((P.EV_RESULT, b"r1"))
        out.add((P.EV_DONE, 1, P.DONE_OK, None))
        out.add((P.EV_RESULT, b"r2"))
        out.add((P.EV_DONE, 2, P.DONE_OK, None))
        out.add((P.EV_LOG, {"msg": "between"}))
        out.add((P.EV_DONE, 3, P.DONE_FAILED, None))
        out.add((P.EV_DONE, 4, P.DONE_OK, b"reply"))  # a reply is not folded
        out.add((P.EV_DONE, 5, P.DONE_OK, None))
        out.add((P.EV_BYE,))
        await asyncio.sleep(0)  # the one flush scheduled by the first add
        assert _frames(r) == [
            [
                (P.EV_RESULTS, [b"r1", b"r2"]),
                (P.EV_ACKS, [1, 2]),
                (P.EV_LOG, {"msg": "between"}),
                (P.EV_DONE, 3, P.DONE_FAILED, None),
                (P.EV_DONE, 4, P.DONE_OK, b"reply"),
                (P.EV_ACKS, [5]),
                (P.EV_BYE,),
            ]
        ]
        # A frame that ends in a run: the flush closes it.
        out.add((P.EV_RESULT, pickle.dumps(3)))
        out.add((P.EV_DONE, 6, P.DONE_OK, None))
        await asyncio.sleep(0)
        assert _frames(r) == [[(P.EV_RESULTS, [pickle.dumps(3)]), (P.EV_ACKS, [6])]]
    finally:
        out.detach()
        os.close(r)
        os.close(w)
