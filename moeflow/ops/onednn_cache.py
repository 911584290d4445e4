"""oneDNN's cache of compiled GEMMs, bounded in the processes moeflow starts. Without torch:
the command line sets it before it knows whether a command loads torch (`simulate` does not).

oneDNN keeps a compiled kernel for each GEMM shape it has run, up to 1,024 of them (~0.4 MB
each here). A server meets a new shape with most prefill lengths and batch sizes: a tiny
model's engine grew 594 -> 1,030 MB over 27 rounds of mixed requests with the default, and
held at 839-847 MB from round 23 to 59 with 128, the rounds as fast.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ONEDNN_CACHE_ENTRIES = 128
ONEDNN_CACHE_VAR = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def bound_onednn_cache(env: MutableMapping[str, str] = os.environ) -> None:
    """Cap oneDNN's cache of compiled GEMMs in `env` (read when oneDNN makes its first
    GEMM: before any runs, in this process or a child's environment), unless set there."""
    env.setdefault(ONEDNN_CACHE_VAR, str(ONEDNN_CACHE_ENTRIES))
