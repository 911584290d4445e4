"""How the CPU worker runs small ops: which matmul backend a node's GEMMs use, how routed
experts are grouped, and how index tensors are made.

On x86 CPUs torch sends bf16 matmuls to oneDNN, which is fast when many rows share a weight
(prefill: ~400 GFLOP/s here) but streams weights at half the memory bandwidth when one or a
few rows do (decode), and its bf16 `linear` has a slow path for a single row. With oneDNN
off, torch's own bf16 GEMV kernels stream weights near the memory bandwidth. Measured on
this project's 2-core AVX-512 machine, streaming 400 cold [768, 1024] weights:

    rows per weight       1         2         3         4        8       64+
    oneDNN             12 GB/s   12 GB/s   11 GB/s   11 GB/s  12 GB/s  ~400 GFLOP/s
    torch native       32 GB/s   18 GB/s   13 GB/s   10 GB/s   5 GB/s   ~43 GFLOP/s

The switch is torch's process-wide flag, so this is only for code that runs one node at a
time on a thread (the CPU worker, which puts it back as it was after each node); it costs a
C call.

Every torch op also costs about a microsecond of dispatch on this machine whatever its
size, and a oneDNN call 12-20 us, so decode (a few rows per weight) is mostly overhead:
see `padded_experts_pay` for the routed experts. Some small ops (index_add_, softmax,
index_select of wide rows) open an OpenMP region whatever their size: with 2 threads it
costs them 3-10 us more than one thread takes (index_add_ of 4 rows: 12 us, not 4), and on
a busy machine a region can wait a scheduler tick for its second thread. `OneThread` runs
such ops on the calling thread alone.

Freed memory is kept for reuse (`keep_freed_memory`). By default glibc's malloc hands
large freed blocks back to the kernel (through munmap, or by trimming a thread's heap),
so the next tensor of that size takes a page fault on every 4 KiB page it touches, and a
page fault costs several microseconds in a virtual machine. A 512-token prefill of the
benchmark checkpoint took ~52,000 page faults; gathering its routed rows, [4096, 1024] bf16
a layer, cost 2-12 ms where the copy alone takes 0.1. Kept, 16,000-22,000 faults and
0.4-1.3 ms a gather, and the prefill ran 601-726 tok/s against 500-683 (five processes of
each in turn, four or five prefills each).
"""

from __future__ import annotations

import ctypes
import os
import sys
from array import array
from collections.abc import Sequence

import torch

SMALL_GEMM_ROWS = 3
SMALL_GEMM_MACS = 1 << 18  # below, torch's GEMM beats oneDNN at any rows ([64, 256] x [256, 16])
SERIAL_ROWS = 64  # rows (tokens, KV blocks) up to which gathers and scatters use one thread


def rows_per_weight(rows: int, weight_numel: int | None = None) -> None:
    """Pick the backend for GEMMs in which `rows` input rows meet each weight matrix (of
    `weight_numel` elements, if known: a small weight, like a router's, stays on torch's
    kernels for more rows, as oneDNN's ~12 us per call outweighs their per-row cost)."""
    use_onednn(rows > SMALL_GEMM_ROWS and (weight_numel is None
                                            or rows * weight_numel > SMALL_GEMM_MACS))


def batched_gemms() -> None:
    """Pick the backend for batched GEMMs (bmm), which oneDNN runs faster at any rows."""
    use_onednn(True)


def onednn_enabled() -> bool:
    """torch's process-wide switch: whether its CPU matmuls may run on oneDNN."""
    return bool(torch._C._get_mkldnn_enabled())


def use_onednn(want: bool) -> None:
    """Set torch's process-wide oneDNN switch (see `rows_per_weight`)."""
    if torch._C._get_mkldnn_enabled() != want:
        torch._C._set_mkldnn_enabled(want)


class OneThread:
    """`with OneThread(active):` runs torch ops on the calling thread alone, for ops too
    small to gain from more (torch's thread count is process-wide: CPU worker only)."""

    def __init__(self, active: bool = True) -> None:
        self.threads = torch.get_num_threads() if active else 1

    def __enter__(self) -> None:
        if self.threads > 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.threads > 1:
            torch.set_num_threads(self.threads)


def index_tensor(values: Sequence[int]) -> torch.Tensor:
    """Python ints -> an int64 CPU tensor [n], for a third of torch.tensor's cost (it
    shares the array's memory, which it keeps alive)."""
    if not values:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(array("q", values), dtype=torch.int64)


# Routed experts on the CPU: a node's SwiGLU over the rows its experts got, measured on
# this machine in the demo model's decode (bf16, [512, 256] gate-up and [256, 256] down
# weights per expert, 8 experts per node; us, node overheads left out):
#
#     a loop over the experts with rows    ~23 per expert with 1 row (native GEMV), ~30
#                                          with 2, ~70 with 4+ (oneDNN)
#     one padded bmm over all 8 (oneDNN)   ~105 at 1 row per expert, ~155 at 6, ~180 at 12
#
# Streaming the weights is most of each: the loop reads only the experts that have rows,
# the padded bmm every expert of the group, but with one call's overhead.
LOOP_EXPERT_US = 10.0  # one expert's ops beyond its weights, on native GEMVs
ONEDNN_EXPERT_US = 40.0  # the same on oneDNN, which also streams weights at half the rate
PADDED_CALL_US = 10.0  # the padded bmm's ops beyond its weights
PADDED_ROWS_SCALE = 16  # padded rows per expert that double the bmm's time
WEIGHT_BYTES_PER_US = 30e3  # weights streamed by a GEMV or a small-row bmm
NATIVE_ROW_COST = 0.4  # each row beyond the first on native GEMVs, in weight streams


def padded_experts_pay(rows: Sequence[int], weight_bytes: int) -> bool:
    """Whether one padded bmm over every expert of a group beats a loop over the experts
    that have rows. `rows` [G] per expert of the group, `weight_bytes` one expert's."""
    stream = weight_bytes / WEIGHT_BYTES_PER_US
    loop = 0.0
    for n in rows:
        if n:
            loop += (LOOP_EXPERT_US + stream * (1 + NATIVE_ROW_COST * (n - 1))
                     if n <= SMALL_GEMM_ROWS
                     else ONEDNN_EXPERT_US + 2 * stream)
    padded = PADDED_CALL_US + len(rows) * stream * (1 + max(rows) / PADDED_ROWS_SCALE)
    return padded < loop


KEPT_FREE_BYTES = 1 << 30  # freed memory malloc keeps for reuse, and its largest block
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep up to KEPT_FREE_BYTES of freed memory for reuse instead of
    returning it to the kernel, and serve blocks up to that size from its heaps rather than
    fresh mappings (see the module docstring); process-wide, once. The process's resident
    memory then stays at its peak use instead of falling back between steps. Returns
    whether it applies: on Linux with glibc, unless MOEFLOW_KEEP_FREED_MEMORY=off."""
    global _kept
    if _kept is None:
        _kept = False
        if (sys.platform.startswith("linux")
                and os.environ.get("MOEFLOW_KEEP_FREED_MEMORY", "on").lower()
                not in ("off", "0", "false", "no")):
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # an older glibc refuses a block size above 32 MiB: it takes that much then
            _kept = bool(mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES)) and bool(
                mallopt(_M_MMAP_THRESHOLD, KEPT_FREE_BYTES)
                or mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    return _kept
