"""`moeflow calibrate --kernels`: time moeflow's CPU kernels against torch's path on this
machine, by rows per weight, and save the crossovers the CPU worker then takes
(moeflow.ops.cpu.choice).

    linear     x [M, 1024] . w [1024, 1024]^T, bf16, over cold weights (a pool larger
               than the last-level cache), M = 1 .. 512: the kernel against torch's
               backend for M rows (oneDNN or its native GEMV, ops/backend.py)
    experts    8 routed experts of D 1024, F 512, bf16, M rows each, M = 1 .. 256: the
               fused kernel against torch's loop or padded bmm (a 512-token prefill
               of 64 experts, top 8, gives each ~64 rows and its busiest ~100: a table
               that stopped at 64 could never send such a prefill to the kernel)

The crossover of each is the largest M up to which the kernel was never more than 10 %
slower at a measured M. Times are the best of a few passes; bandwidth drifts from minute
to minute, so both paths of one M are timed back to back. Run it on an idle machine: a
busy one makes both paths wait on the scheduler, and the table says little.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from moeflow.ops import cpu as kernels
from moeflow.ops.attention import widen_on_this_cpu
from moeflow.ops.cpu.choice import ALL_ROWS, KernelChoice, linear, use_choice
from moeflow.ops.experts import ExpertGroup, swiglu_batches_cpu

LINEAR_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
EXPERT_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
D, F, G = 1024, 512, 8
POOL_BYTES = 96 << 20


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of fn's fastest run of `repeats`, after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


NOISE = 1.1  # a kernel this much slower than torch at some rows is within the noise here


def _crossover(rows: tuple[int, ...], kernel: list[float], torch_s: list[float],
               extrapolate: bool = False) -> int:
    """The largest rows up to which the kernel was never clearly the slower. With
    `extrapolate` (a CPU without bf16 arithmetic), any rows (ALL_ROWS) when it was never the
    slower and clearly the faster at the most rows measured: there torch's bf16 GEMMs stay
    slow at every size, and the kernels' panels keep their speed (on a 2-core AVX2 EPYC,
    4-5x torch from 256 to 4,096 rows), where a limit at the range's end sent a prefill's
    experts, 64 or more rows each, to torch. With bf16 arithmetic oneDNN gains with size,
    so the measured limit stands."""
    limit = 0
    for m, k, t in zip(rows, kernel, torch_s):
        if k > NOISE * t:
            return limit
        limit = m
    if extrapolate and rows and kernel[-1] * NOISE < torch_s[-1]:
        return ALL_ROWS
    return limit


def calibrate_kernels(quick: bool = False, log: Callable[[str], None] = lambda _: None
                      ) -> tuple[KernelChoice, dict[str, Any]]:
    """Measure both paths; returns the choice and the table of times (seconds)."""
    if not kernels.available():
        raise RuntimeError(f"moeflow's CPU kernels are not available: {kernels.error()}")
    repeats = 2 if quick else 4
    dtype = torch.bfloat16
    weights = [torch.randn(D, D).to(dtype) for _ in range(max(4, POOL_BYTES // (D * D * 2)))]
    kernel_s, torch_s = [], []
    for m in LINEAR_ROWS:
        x = torch.randn(m, D).to(dtype)
        pool = weights if m <= 16 else weights[:8]  # beyond, compute-bound: cache is moot
        kernel_s.append(best_time(lambda: [kernels.linear(x, w) for w in pool], repeats)
                        / len(pool))
        use_choice(KernelChoice(0, 0, "calibrating", fp32_rows=0))
        try:
            torch_s.append(best_time(lambda: [linear(x, w) for w in pool], repeats) / len(pool))
        finally:
            use_choice(None)
        log(f"linear [{m}, {D}] x [{D}, {D}]: kernel {kernel_s[-1] * 1e6:8.1f} us, torch "
            f"{torch_s[-1] * 1e6:8.1f} us")
    table: dict[str, Any] = {"linear": {"rows": list(LINEAR_ROWS), "kernel_s": kernel_s,
                                        "torch_s": torch_s}}
    no_bf16 = widen_on_this_cpu()  # torch's bf16 GEMMs slow at every size
    linear_rows = _crossover(LINEAR_ROWS, kernel_s, torch_s, no_bf16)

    groups = [ExpertGroup.of((torch.randn(G, 2 * F, D) / D ** 0.5).to(dtype),
                             (torch.randn(G, D, F) / F ** 0.5).to(dtype))
              for _ in range(max(2, POOL_BYTES // (G * 3 * F * D * 2)))]
    kernel_s, torch_s = [], []
    for m in EXPERT_ROWS:
        x, counts = torch.randn(G * m, D).to(dtype), [[m] * G]
        scale = torch.rand(G * m)
        run = lambda: [swiglu_batches_cpu([x], counts, g, scale) for g in groups]  # noqa: E731
        for limit, out in ((1 << 30, kernel_s), (0, torch_s)):
            use_choice(KernelChoice(1 << 30, limit, "calibrating"))
            try:
                out.append(best_time(run, repeats) / len(groups))
            finally:
                use_choice(None)
        log(f"experts {G} x {m} rows (D {D}, F {F}): kernel {kernel_s[-1] * 1e6:8.1f} us, "
            f"torch {torch_s[-1] * 1e6:8.1f} us")
    table["experts"] = {"rows": list(EXPERT_ROWS), "kernel_s": kernel_s, "torch_s": torch_s}
    table["threads"] = torch.get_num_threads()
    table["isa"] = kernels.describe()
    choice = KernelChoice(linear_rows, _crossover(EXPERT_ROWS, kernel_s, torch_s, no_bf16),
                          "calibrated")
    return choice, table
