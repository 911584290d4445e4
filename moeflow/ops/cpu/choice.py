"""Which path the CPU worker's GEMMs take, by rows per weight: moeflow's kernels
(moeflow.ops.cpu) up to a crossover, torch's (oneDNN or its native GEMV, ops/backend.py)
beyond it.

The crossovers come from the machine that runs: `moeflow calibrate --kernels` times both
paths on it, for linear layers and for routed experts, and writes the largest row count up
to which the kernel is the faster at every count (on a CPU without bf16 arithmetic, every
count when it was still clearly the faster at the most rows measured) into
`<kernel cache>/choice.json`, with the CPU it was measured on and the kernels' path then (a build
with another path measures again). Without that file, or when it was written on another CPU
or path, the worker takes a default by the CPU's features: the kernels stream weights near
the memory bandwidth at a few rows, which no torch path does here, so they always take
decode; with AMX, oneDNN's tiles are the faster at prefill sizes, and the default stops at
16 rows; with AVX-512 BF16 and no AMX, the kernels' bf16-pair panels match or beat oneDNN
up to a few hundred rows (a 2-core EPYC: linear layers 1.2-1.1x oneDNN's speed from 16 to
128 rows, even at 256 and 512; routed experts 1.3-1.1x from 16 to 64 rows each, even at
128, oneDNN 7 % ahead at 256; measured with panels from 16 rows, where the pairs now take
tiles up to 64, faster still), and the default stops at 256 rows for linear layers and 128
per expert; on CPUs without bf16 arithmetic, oneDNN's bf16 GEMMs are slow at every size (on
a 2-core AVX2 EPYC the kernels were 2.5-5x faster from 8 to 4,096 rows per weight), and the
kernels take every size. A routed-expert GEMM compares the mean rows of the experts it runs
with the crossover (their busiest may have more: a 512-token prefill gives 64 experts ~64
rows each, its busiest 80-200), and takes one path for all. Without AVX2 the portable path
has not been measured against torch, and torch's path stays. fp32 GEMMs stop at 16 rows
(torch's fp32 GEMMs are strong at more; calibration measures bf16 only).
MOEFLOW_CPU_KERNELS=on makes every GEMM the kernels can take use them (for tests),
=off none.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from moeflow.ops import cpu as kernels
from moeflow.ops.attention import widen_on_this_cpu
from moeflow.ops.backend import rows_per_weight
from moeflow.ops.cpuinfo import cpu_info as _cpu_info

DEFAULT_ROWS = 16
ALL_ROWS = 1 << 30
# AVX-512 BF16 without AMX: where the kernels' panels stop beating oneDNN (measured above)
BF16_PAIRS_LINEAR_ROWS, BF16_PAIRS_EXPERT_ROWS = 256, 128
# without bf16 arithmetic the kernels' panels beat torch's bf16 GEMMs 4-5x at every size
# measured (256 to 4,096 rows, and 256 to 1,024 per expert, on a 2-core AVX2 EPYC)
NO_BF16_ROWS = NO_BF16_EXPERT_ROWS = ALL_ROWS
KERNEL_DTYPES = (torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KernelChoice:
    """Rows per weight up to which each kind of GEMM runs on the kernels, and whether
    decode and prefill attention do."""

    linear_rows: int = DEFAULT_ROWS  # bf16
    expert_rows: int = DEFAULT_ROWS  # bf16, rows per expert
    source: str = "default"
    attention: bool = True  # decode attention reads the paged cache in place
    fp32_rows: int = DEFAULT_ROWS  # either kind, in fp32
    # a prompt's causal attention on the kernel (bf16, AVX-512 BF16), not torch's SDPA
    prefill_attention: bool = True
    # rows per weight from which the kernels' GEMMs on bf16 pairs take panels, not tiles
    # (kernels.panel_rows); 0: the kernels' own default
    panel_rows: int = 0

    def linear_limit(self, dtype: torch.dtype) -> int:
        return self.linear_rows if dtype == torch.bfloat16 else self.fp32_rows

    def expert_limit(self, dtype: torch.dtype) -> int:
        return self.expert_rows if dtype == torch.bfloat16 else self.fp32_rows

    def __post_init__(self) -> None:
        if self.linear_rows < 0 or self.expert_rows < 0 or self.panel_rows < 0:
            raise ValueError(f"row limits must be >= 0, got {self.linear_rows}, "
                             f"{self.expert_rows} and {self.panel_rows}")


def cpu_name() -> str:
    """This CPU, as choice.json records it: model name and the ISA flags kernels use."""
    model, flags = _cpu_info()
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} [{' '.join(isa)}] x{os.cpu_count()}"


def choice_path() -> Path:
    return kernels.cache_dir() / "choice.json"


def save_choice(choice: KernelChoice, table: dict[str, object]) -> Path:
    path = choice_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"cpu": cpu_name(), "linear_rows": choice.linear_rows,
            "expert_rows": choice.expert_rows, "attention": choice.attention,
            "panel_rows": choice.panel_rows, "table": table}
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(partial, path)  # a reader sees the old file or the new one, never half
    _measured_choice.cache_clear()
    return path


_override: list[KernelChoice] = []


def use_choice(choice: KernelChoice | None) -> None:
    """Make `kernel_choice()` return `choice` in this process (None: the measured one
    again); for calibration and tests."""
    _override[:] = [] if choice is None else [choice]
    _set_panel_rows(_measured_choice() if choice is None else choice)


_kernels_panel_rows: list[int] = []  # the kernels' own default, once a choice changed it


def _set_panel_rows(choice: KernelChoice) -> None:
    """The kernels take `choice`'s panel rows, or their own default when it has none (an
    override that set some, then cleared, leaves nothing behind)."""
    if choice.panel_rows:
        if not _kernels_panel_rows:
            _kernels_panel_rows.append(kernels.panel_rows())
        kernels.set_panel_rows(choice.panel_rows)
    elif _kernels_panel_rows:
        kernels.set_panel_rows(_kernels_panel_rows[0])


def kernel_choice() -> KernelChoice:
    """The choice in use: the one set by `use_choice`, else the measured one for this CPU,
    else the default; all zero without kernels."""
    return _override[0] if _override else _measured_choice()


@cache
def _measured_choice() -> KernelChoice:
    mode = kernels.mode()
    if not kernels.available():
        return KernelChoice(0, 0, f"unavailable: {kernels.error()}", attention=False,
                            fp32_rows=0, prefill_attention=False)
    if mode == "on":
        return KernelChoice(ALL_ROWS, ALL_ROWS, "MOEFLOW_CPU_KERNELS=on", fp32_rows=ALL_ROWS)
    try:
        body = json.loads(choice_path().read_text())
        # measured on this CPU, with the kernel path in use now (a newer build may have
        # another path, whose crossovers differ)
        if (body.get("cpu") == cpu_name()
                and body.get("table", {}).get("isa") == kernels.describe()):
            measured = KernelChoice(int(body["linear_rows"]), int(body["expert_rows"]),
                                    str(choice_path()), bool(body.get("attention", True)),
                                    panel_rows=int(body.get("panel_rows", 0)))
            _set_panel_rows(measured)
            return measured
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return default_choice()


def default_choice() -> KernelChoice:
    """The choice without a calibration for this CPU (see the module docstring)."""
    if kernels.best_isa() < 1:  # the portable path alone: not measured, keep torch's
        return KernelChoice(0, 0, "default for a CPU without AVX2", attention=False,
                            fp32_rows=0)
    if widen_on_this_cpu():  # no bf16 arithmetic
        return KernelChoice(NO_BF16_ROWS, NO_BF16_EXPERT_ROWS,
                            "default for a CPU without bf16 arithmetic")
    if kernels.best_isa() >= 2 and "amx_bf16" not in _cpu_info()[1]:  # the pairs path
        return KernelChoice(BF16_PAIRS_LINEAR_ROWS, BF16_PAIRS_EXPERT_ROWS,
                            "default for a CPU with AVX-512 BF16 and no AMX")
    return KernelChoice()


def describe(dtype: torch.dtype = torch.bfloat16) -> str:
    """The kernel path and its crossovers for GEMMs in `dtype`, for stats lines."""
    c = kernel_choice()
    if not kernels.available():
        return kernels.describe()
    if dtype not in KERNEL_DTYPES:
        return f"torch's ({str(dtype).removeprefix('torch.')}: no kernels)"

    def rows(n: int) -> str:
        return "any rows" if n >= ALL_ROWS else f"{n} rows"

    if dtype == torch.float32:
        return (f"{kernels.describe()} kernels for fp32 GEMMs up to {rows(c.fp32_rows)} per "
                f"weight ({c.source})")
    panels = (f", on panels from {kernels.panel_rows()} rows" if kernels.best_isa() >= 2
              else "")
    return (f"{kernels.describe()} kernels for bf16 GEMMs up to {rows(c.linear_rows)} "
            f"(linear) / {rows(c.expert_rows)} per expert{panels} ({c.source})")


def kernel_takes(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether the kernels take x [rows, K] with these weights (None: an absent bias)."""
    return (x.dtype in KERNEL_DTYPES and x.dim() == 2 and x.is_cpu
            and all(w is None or (w.dtype == x.dtype and w.is_contiguous()) for w in weights))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """F.linear for the CPU worker: x [M, K], w [N, K] -> [M, N], on the kernel up to the
    crossover, else on torch's backend for M rows (CPU worker only: it sets torch's
    process-wide matmul backend)."""
    if x.shape[0] <= kernel_choice().linear_limit(x.dtype) and kernel_takes(x, w, bias):
        return kernels.linear(x.contiguous(), w, bias)
    rows_per_weight(x.shape[0], w.numel())
    return F.linear(x, w, bias)
