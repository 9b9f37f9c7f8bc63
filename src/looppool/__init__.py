"""looppool: a pool of worker processes, each running its own asyncio event loop.

See the README for a guide; the public names are re-exported here.
"""

from ._core import PoolStats as PoolStats
from ._errors import LooppoolError as LooppoolError
from ._errors import MessageTimeout as MessageTimeout
from ._errors import PoolBroken as PoolBroken
from ._errors import PoolClosed as PoolClosed
from ._errors import QueueFull as QueueFull
from ._errors import RemoteError as RemoteError
from ._errors import RemoteTraceback as RemoteTraceback
from ._errors import WorkerLost as WorkerLost
from ._errors import WorkerStartError as WorkerStartError
from ._functions import FunctionWorker as FunctionWorker
from ._pool import Pool as Pool
from ._worker import HookNameWarning as HookNameWarning
from ._worker import SafeWorker as SafeWorker
from ._worker import Worker as Worker
from ._worker import WorkerFactory as WorkerFactory

#: The version, written only here: the build reads it from this line
#: (``[tool.hatch.version]`` in pyproject.toml), so the metadata agrees. A
#: literal rather than ``importlib.metadata.version("looppool")``, which would
#: name whatever distribution called "looppool" is installed (the unrelated
#: Tornado package of that name on the package index, say) when this source
#: tree is imported from a checkout.
__version__ = "1.0.0.dev0"

__all__ = [
    "FunctionWorker",
    "HookNameWarning",
    "LooppoolError",
    "MessageTimeout",
    "Pool",
    "PoolBroken",
    "PoolClosed",
    "PoolStats",
    "QueueFull",
    "RemoteError",
    "RemoteTraceback",
    "SafeWorker",
    "Worker",
    "WorkerFactory",
    "WorkerLost",
    "WorkerStartError",
    "__version__",
]
