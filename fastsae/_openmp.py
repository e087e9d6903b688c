"""A shorter OpenMP spin wait for fastsae's processes, set before torch loads its OpenMP runtime.

torch's CPU ops are OpenMP parallel regions; at the end of each, a thread that finished waits for
the others by spinning (GNU libgomp, which torch's wheels ship: GOMP_SPINCOUNT, default 300,000
iterations) before it sleeps. On a machine with any other runnable process, a spinning thread
holds a core that its descheduled sibling needs to finish the region, so every small op can cost a
scheduler time slice. Measured on the project's 2-core CPU machine, the embedded preset's training
step (`fastsae train embedded`, 2 threads): 123 ms idle and 1,635 ms with one other busy process
at the default; with GOMP_SPINCOUNT=10000, 125 ms and 366 ms (3,000: 145 and 285; 0: 171 and 249;
one thread: 233 and 246).

shorten_spin_wait() sets GOMP_SPINCOUNT=10000 unless the environment sets it, and only while torch
is not imported yet (libgomp reads it once, when it loads): the `fastsae` command and
`python -m fastsae` / `torchrun -m fastsae` get it; a program that imported torch before fastsae
keeps its own setting. Intel's OpenMP runtime (KMP_BLOCKTIME) is left alone: not measured here.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "10000"


def shorten_spin_wait() -> None:
    if "torch" not in sys.modules:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
