"""SwiGLU expert FFNs, and the routed experts of a node run over batches of rows sorted by
expert: on accelerators as two grouped matmuls, on the CPU as a loop over the experts that
have rows or as two padded batched matmuls, whichever `padded_experts_pay` expects to be
faster (see ops/backend.py).

Shapes: N routed rows (token, expert) sorted by expert, T tokens, D hidden, F FFN width,
E (or G) experts held here, M rows per expert after padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from moeflow.ops.backend import batched_gemms, index_tensor, padded_experts_pay, rows_per_weight


@dataclass
class ExpertGroup:
    """G routed experts of one layer, contiguous in their stack."""

    gate_up: torch.Tensor  # [G, 2F, D]
    down: torch.Tensor  # [G, D, F]
    per_expert: list[tuple[torch.Tensor, torch.Tensor]]  # G x ([2F, D], [D, F])
    bytes_per_expert: int

    @staticmethod
    def of(gate_up: torch.Tensor, down: torch.Tensor) -> ExpertGroup:
        return ExpertGroup(gate_up, down, list(zip(gate_up.unbind(), down.unbind())),
                           (gate_up[0].numel() + down[0].numel()) * gate_up.element_size())


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


def padded_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [E, M, D] (M rows per expert, padding included), gate_up [E, 2F, D], down [E, D, F]
    -> [E, M, D]: two batched GEMMs, each expert's weights read once whatever its rows."""
    h = torch.bmm(x, gate_up.transpose(1, 2))  # [E, M, 2F]
    width = down.shape[2]
    a = F.silu(h[..., :width]).mul_(h[..., width:])  # [E, M, F]
    return torch.bmm(a, down.transpose(1, 2))


def grouped_swiglu_ref(x: torch.Tensor, counts: list[int], gate_up: torch.Tensor,
                       down: torch.Tensor) -> torch.Tensor:
    """Reference for `grouped_swiglu`, one expert at a time (tests only)."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        outs.append(swiglu(x[start:start + n], gate_up[e], down[e]))
        start += n
    return torch.cat(outs) if outs else x.new_empty(0, down.shape[1])


def swiglu_batches_cpu(xs: list[torch.Tensor], counts: list[list[int]], group: ExpertGroup
                       ) -> torch.Tensor:
    """Batches of rows, each sorted by expert: xs [n_b, D], counts [batch][G] rows per
    expert -> every row's output [sum n_b, D], batches in order. CPU worker only (it picks
    torch's process-wide matmul backend)."""
    per_expert = [sum(c) for c in zip(*counts)]
    x = xs[0] if len(xs) == 1 else torch.cat(xs)  # [n, D]
    order = _expert_major(counts)  # rows of x, expert by expert
    if padded_experts_pay(per_expert, group.bytes_per_expert):
        width = max(per_expert)
        src, dest = _padded_layout(order, per_expert, width)
        index = index_tensor(src + dest)
        batched_gemms()
        y = padded_swiglu(x.index_select(0, index[:len(src)]).view(len(per_expert), width, -1),
                          group.gate_up, group.down)  # [G, M, D]
        return y.view(len(src), -1).index_select(0, index[len(src):])
    merged = len(xs) > 1
    if merged:
        index = index_tensor(order + _inverse(order))
        x = x.index_select(0, index[:len(order)])
    outs, row = [], 0
    for (gate_up, down), n in zip(group.per_expert, per_expert):
        if n:
            rows_per_weight(n)
            outs.append(swiglu(x[row:row + n], gate_up, down))
            row += n
    y = outs[0] if len(outs) == 1 else torch.cat(outs)
    return y.index_select(0, index[len(order):]) if merged else y


def swiglu_batches_grouped(xs: list[torch.Tensor], ends: list[torch.Tensor],
                           group: ExpertGroup) -> torch.Tensor:
    """`swiglu_batches_cpu` as grouped GEMMs, with no host round trip (accelerators); ends
    [batch][G] (int32) cumulative row ends per expert."""
    if len(xs) == 1:
        return grouped_swiglu(xs[0], ends[0], group.gate_up, group.down)
    # merge the batches so that each expert's rows are contiguous
    counts = [torch.diff(e, prepend=e.new_zeros(1)) for e in ends]
    expert_of_row = torch.cat([
        torch.repeat_interleave(torch.arange(len(c), device=c.device), c) for c in counts])
    perm = torch.argsort(expert_of_row, stable=True)
    merged_ends = torch.stack(counts).sum(0).cumsum(0, dtype=torch.int32)
    y = grouped_swiglu(torch.cat(xs)[perm], merged_ends, group.gate_up, group.down)
    unsorted = torch.empty_like(y)
    unsorted[perm] = y
    return unsorted


def _expert_major(counts: list[list[int]]) -> list[int]:
    """Rows per expert of each batch ([batch][G]; each batch's rows sorted by expert, the
    batches concatenated) -> every row, expert by expert (then batch by batch)."""
    starts, base = [], 0
    for c in counts:
        starts.append(list(accumulate(c[:-1], initial=base)))
        base += sum(c)
    if len(counts) == 1:
        return list(range(base))
    return [r for e in range(len(counts[0])) for c, s in zip(counts, starts) if c[e]
            for r in range(s[e], s[e] + c[e])]


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for k, r in enumerate(order):
        inverse[r] = k
    return inverse


def _padded_layout(order: list[int], per_expert: list[int], width: int
                   ) -> tuple[list[int], list[int]]:
    """Rows expert by expert (`order`) laid out `width` slots per expert: the row each
    slot takes [G * width] (padding takes row 0) and each row's slot [n]."""
    src = [0] * (len(per_expert) * width)
    dest = [0] * len(order)
    pos = 0
    for e, n in enumerate(per_expert):
        base = e * width
        rows = order[pos:pos + n]
        src[base:base + n] = rows
        for j, r in enumerate(rows):
            dest[r] = base + j
        pos += n
    return src, dest
