"""Which CPU matmul backend a node's GEMMs use, chosen by how many rows meet each weight.

On x86 CPUs torch sends bf16 matmuls to oneDNN, which is fast when many rows share a weight
(prefill: ~400 GFLOP/s here) but streams weights at half the memory bandwidth when one or a
few rows do (decode), and its bf16 `linear` has a slow path for a single row. With oneDNN
off, torch's own bf16 GEMV kernels stream weights near the memory bandwidth. Measured on
this project's 2-core AVX-512 machine, streaming 400 cold [768, 1024] weights:

    rows per weight       1         2         3         4        8       64+
    oneDNN             12 GB/s   12 GB/s   11 GB/s   11 GB/s  12 GB/s  ~400 GFLOP/s
    torch native       32 GB/s   18 GB/s   13 GB/s   10 GB/s   5 GB/s   ~43 GFLOP/s

The switch is torch's process-wide flag, so this is only for code that runs one node at a
time on a thread (the CPU worker); it costs a C call.
"""

from __future__ import annotations

import torch

SMALL_GEMM_ROWS = 3


def rows_per_weight(rows: int) -> None:
    """Pick the backend for GEMMs in which `rows` input rows meet each weight matrix."""
    want = rows > SMALL_GEMM_ROWS
    if torch._C._get_mkldnn_enabled() != want:
        torch._C._set_mkldnn_enabled(want)
