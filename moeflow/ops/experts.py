"""SwiGLU expert FFNs. Routed experts run as two grouped matmuls over tokens sorted by
expert, never as a Python loop over experts.

Shapes: N routed rows (token, expert) sorted by expert, T tokens, D hidden, F FFN width,
E experts held here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [T, D], gate_up [2F, D] (gate rows first), down [D, F] -> [T, D]"""
    h = F.linear(x, gate_up)  # [T, 2F]
    width = down.shape[1]
    return F.linear(F.silu(h[:, :width]) * h[:, width:], down)


def grouped_swiglu(x: torch.Tensor, offsets: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """x [N, D] sorted by expert, offsets [E] (int32, cumulative row ends),
    gate_up [E, 2F, D], down [E, D, F] -> [N, D]

    Rows offsets[e-1]:offsets[e] go through expert e; an expert with no rows costs nothing.
    On CUDA, grouped_mm takes bf16 only; other dtypes there go expert by expert.
    """
    if x.is_cuda and x.dtype != torch.bfloat16:
        ends = offsets.tolist()
        counts = [b - a for a, b in zip([0, *ends[:-1]], ends)]
        return grouped_swiglu_ref(x, counts, gate_up, down)
    h = F.grouped_mm(x, gate_up.transpose(1, 2), offs=offsets)  # [N, 2F]
    width = down.shape[2]
    a = F.silu(h[:, :width]).mul_(h[:, width:])  # [N, F]
    return F.grouped_mm(a, down.transpose(1, 2), offs=offsets)  # [N, D]


def grouped_swiglu_ref(x: torch.Tensor, counts: list[int], gate_up: torch.Tensor,
                       down: torch.Tensor) -> torch.Tensor:
    """Reference for `grouped_swiglu`, one expert at a time (tests only)."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        outs.append(swiglu(x[start:start + n], gate_up[e], down[e]))
        start += n
    return torch.cat(outs) if outs else x.new_empty(0, down.shape[1])
