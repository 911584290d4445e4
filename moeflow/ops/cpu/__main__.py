"""`python -m moeflow.ops.cpu`: build moeflow's CPU kernels now (make install runs it) and
say which path the CPU worker will take. A failed build is reported, not fatal: the
worker then keeps torch's path."""

import sys
import time

from moeflow.ops import cpu
from moeflow.ops.cpu.choice import describe

start = time.perf_counter()
print(f"building moeflow's CPU kernels in {cpu.cache_dir()} ...", file=sys.stderr, flush=True)
if cpu.available():
    print(f"CPU kernels ready in {time.perf_counter() - start:.0f} s: {describe()}",
          file=sys.stderr)
else:
    print(f"warning: moeflow's CPU kernels were not built ({cpu.error()}); the CPU worker "
          f"uses torch's GEMMs. Install a C++ compiler (e.g. apt install g++) and run "
          f"`python -m moeflow.ops.cpu` again.", file=sys.stderr)
