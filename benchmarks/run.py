"""Run looppool's benchmark: ``python benchmarks/run.py [options]``.

The same as ``looppool bench [options]``; ``--help`` lists the options. Run
from a checkout without installing, it finds the package in ``src/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import looppool._bench as bench
except ImportError:  # a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import looppool._bench as bench

# The guard matters: spawned worker processes import this file again (as
# ``__mp_main__``), and must not start a benchmark of their own.
if __name__ == "__main__":
    sys.exit(bench.main())
