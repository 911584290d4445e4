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
    panels     on a CPU with AVX-512 BF16 (the kernels' bf16 pairs), the linear layers
               above at M = 16 .. 256 on the kernels' tiles and on their packed panels:
               tiles stream the weights as they multiply, panels pack a block before
               they multiply it and win once the arithmetic binds

The crossover of each is the largest M up to which the kernel was never more than 10 %
slower at a measured M; the panels' is the smallest M from which panels were at least as
fast as tiles at every M measured (twice the largest M measured when tiles always won).
Times are the best of a few rounds, and each round times every path of one M once, in
turn: bandwidth drifts from minute to minute, and a path timed in a slow moment of its own
(one quick run sent every linear layer of 2 rows or more to torch: 123 us against torch's
105 at 2 rows, 90 against 157 at 4) would move a crossover. Run it on an idle machine: a
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
PANEL_ROWS = (16, 24, 32, 48, 64, 96, 128, 192, 256)
D, F, G = 1024, 512, 8
POOL_BYTES = 96 << 20


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of fn's fastest run of `repeats`, after one warm-up run."""
    return best_times([fn], repeats)[0]


def best_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Seconds of each fn's fastest run: a warm-up run each, then `repeats` rounds that run
    every fn once, in turn (the order reversed every other round)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for r in range(repeats):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            start = time.perf_counter()
            fns[i]()
            best[i] = min(best[i], time.perf_counter() - start)
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


def _panels_from(rows: tuple[int, ...], tiles: list[float], panels: list[float]) -> int:
    """The smallest rows from which panels were at least as fast as tiles at every larger
    count measured; twice the largest count when tiles won there."""
    start = 2 * rows[-1]
    for m, t, p in reversed(list(zip(rows, tiles, panels))):
        if p > t:
            break
        start = m
    return start


def _panel_times(weights: list[torch.Tensor], repeats: int, log: Callable[[str], None]
                 ) -> tuple[list[float], list[float]]:
    """Seconds per linear layer at each of PANEL_ROWS, on tiles and on panels."""
    tiles_s, panels_s = [], []
    before = kernels.panel_rows()
    try:
        for m in PANEL_ROWS:
            x = torch.randn(m, D).to(weights[0].dtype)
            pool = weights if m <= 64 else weights[:8]  # streamed at decode sizes

            def on(rows: int) -> Callable[[], object]:
                def run() -> object:
                    kernels.set_panel_rows(rows)
                    return [kernels.linear(x, w) for w in pool]
                return run

            tiles, panels = best_times([on(ALL_ROWS), on(1)], repeats)
            tiles_s.append(tiles / len(pool))
            panels_s.append(panels / len(pool))
            log(f"linear [{m}, {D}] x [{D}, {D}] on pairs: tiles {tiles_s[-1] * 1e6:8.1f} us, "
                f"panels {panels_s[-1] * 1e6:8.1f} us")
    finally:
        kernels.set_panel_rows(before)
    return tiles_s, panels_s


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

        def on_torch() -> object:
            use_choice(KernelChoice(0, 0, "calibrating", fp32_rows=0))
            try:
                return [linear(x, w) for w in pool]
            finally:
                use_choice(None)

        kernel, on_torch_s = best_times(
            [lambda: [kernels.linear(x, w) for w in pool], on_torch], repeats)
        kernel_s.append(kernel / len(pool))
        torch_s.append(on_torch_s / len(pool))
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

        def up_to(limit: int) -> Callable[[], object]:
            def run() -> object:
                use_choice(KernelChoice(1 << 30, limit, "calibrating"))
                try:
                    return [swiglu_batches_cpu([x], counts, g, scale)
                            for g in groups]
                finally:
                    use_choice(None)
            return run

        kernel, on_torch_s = best_times([up_to(1 << 30), up_to(0)], repeats)
        kernel_s.append(kernel / len(groups))
        torch_s.append(on_torch_s / len(groups))
        log(f"experts {G} x {m} rows (D {D}, F {F}): kernel {kernel_s[-1] * 1e6:8.1f} us, "
            f"torch {torch_s[-1] * 1e6:8.1f} us")
    table["experts"] = {"rows": list(EXPERT_ROWS), "kernel_s": kernel_s, "torch_s": torch_s}
    panel_rows = 0  # the kernels' default: only the pairs have the choice
    if kernels.best_isa() >= 2:
        tiles_s, panels_s = _panel_times(weights, repeats, log)
        table["panels"] = {"rows": list(PANEL_ROWS), "tiles_s": tiles_s, "panels_s": panels_s}
        panel_rows = _panels_from(PANEL_ROWS, tiles_s, panels_s)
    table["threads"] = torch.get_num_threads()
    table["isa"] = kernels.describe()
    choice = KernelChoice(linear_rows, _crossover(EXPERT_ROWS, kernel_s, torch_s, no_bf16),
                          "calibrated", panel_rows=panel_rows)
    return choice, table
