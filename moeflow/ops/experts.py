"""SwiGLU expert FFNs, and the routed experts of a node run over batches of rows sorted by
expert: on accelerators as two grouped matmuls, on the CPU as a loop over the experts that
have rows or as two padded batched matmuls, whichever `padded_experts_pay` expects to be
faster (see ops/backend.py).

A caller may name the kernel (the scheduler's `on_routing` choice, moeflow.scheduler.base):
"grouped" runs the group's experts in one call (the fused CPU kernel where it is built;
grouped_mm on accelerators), "dense" runs a dense matmul per expert that has rows. Left
unnamed, each path picks as above. The results are the same either way.

Experts may have biases on both projections and GPT-OSS's clamped SwiGLU (`Activation`);
every path takes them.

Shapes: N routed rows (token, expert) sorted by expert, T tokens, D hidden, F FFN width,
E (or G) experts held here, M rows per expert after padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from moeflow.ops import cpu as kernels
from moeflow.ops.backend import batched_gemms, index_tensor, padded_experts_pay, rows_per_weight
from moeflow.ops.cpu.choice import kernel_choice, kernel_takes


@dataclass(frozen=True)
class Activation:
    """h [..., 2F] (gate, then up) -> [..., F]. Plain SwiGLU, silu(gate) * up; with `limit`
    GPT-OSS's: gate clamped above, up to [-limit, limit], (up + 1) * gate * sigmoid(alpha *
    gate)."""

    limit: float | None = None
    alpha: float = 1.0

    def __call__(self, h: torch.Tensor, width: int) -> torch.Tensor:
        if self.limit is None:
            return F.silu(h[..., :width]).mul_(h[..., width:])
        gate = h[..., :width].clamp(max=self.limit)
        up = h[..., width:].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


SILU = Activation()


@dataclass
class ExpertGroup:
    """G routed experts of one layer, contiguous in their stack."""

    gate_up: torch.Tensor  # [G, 2F, D]
    down: torch.Tensor  # [G, D, F]
    # G x ([2F, D], [D, F], gate/up bias [2F] or None, down bias [D] or None)
    per_expert: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                           torch.Tensor | None]]
    bytes_per_expert: int
    gate_up_bias: torch.Tensor | None = None  # [G, 2F]
    down_bias: torch.Tensor | None = None  # [G, D]
    act: Activation = SILU

    @staticmethod
    def of(gate_up: torch.Tensor, down: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
           down_bias: torch.Tensor | None = None, act: Activation = SILU) -> ExpertGroup:
        n = gate_up.shape[0]
        gu_b = [None] * n if gate_up_bias is None else list(gate_up_bias.unbind())
        d_b = [None] * n if down_bias is None else list(down_bias.unbind())
        return ExpertGroup(gate_up, down,
                           list(zip(gate_up.unbind(), down.unbind(), gu_b, d_b)),
                           (gate_up[0].numel() + down[0].numel()) * gate_up.element_size(),
                           gate_up_bias, down_bias, act)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
           gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
           act: Activation = SILU) -> torch.Tensor:
    """x [T, D], gate_up [2F, D] (gate rows first), down [D, F], biases [2F] and [D] or
    None -> [T, D]"""
    h = F.linear(x, gate_up, gate_up_bias)  # [T, 2F]
    return F.linear(act(h, down.shape[1]), down, down_bias)


def grouped_swiglu(x: torch.Tensor, offsets: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
                   down_bias: torch.Tensor | None = None, act: Activation = SILU
                   ) -> torch.Tensor:
    """x [N, D] sorted by expert, offsets [E] (int32, cumulative row ends),
    gate_up [E, 2F, D], down [E, D, F], biases [E, 2F] and [E, D] or None -> [N, D]

    Rows offsets[e-1]:offsets[e] go through expert e; an expert with no rows costs nothing.
    On CUDA, grouped_mm takes bf16 only; other dtypes there go expert by expert.
    """
    if x.is_cuda and x.dtype != torch.bfloat16:
        ends = offsets.tolist()
        counts = [b - a for a, b in zip([0, *ends[:-1]], ends)]
        return grouped_swiglu_ref(x, counts, gate_up, down, gate_up_bias, down_bias, act)
    h = F.grouped_mm(x, gate_up.transpose(1, 2), offs=offsets)  # [N, 2F]
    rows = None
    if gate_up_bias is not None or down_bias is not None:  # each row's expert, on device
        counts_t = torch.diff(offsets, prepend=offsets.new_zeros(1))
        rows = torch.repeat_interleave(torch.arange(len(offsets), device=x.device), counts_t,
                                       output_size=x.shape[0])
    if gate_up_bias is not None:
        h = h + gate_up_bias[rows]
    a = act(h, down.shape[2])  # [N, F]
    y = F.grouped_mm(a, down.transpose(1, 2), offs=offsets)  # [N, D]
    return y if down_bias is None else y + down_bias[rows]


def padded_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  gate_up_bias: torch.Tensor | None = None,
                  down_bias: torch.Tensor | None = None, act: Activation = SILU
                  ) -> torch.Tensor:
    """x [E, M, D] (M rows per expert, padding included), gate_up [E, 2F, D], down [E, D, F],
    biases [E, 2F] and [E, D] or None -> [E, M, D]: two batched GEMMs, each expert's weights
    read once whatever its rows."""
    h = torch.bmm(x, gate_up.transpose(1, 2))  # [E, M, 2F]
    if gate_up_bias is not None:
        h = h + gate_up_bias[:, None, :]
    y = torch.bmm(act(h, down.shape[2]), down.transpose(1, 2))  # [E, M, D]
    return y if down_bias is None else y + down_bias[:, None, :]


def grouped_swiglu_ref(x: torch.Tensor, counts: list[int], gate_up: torch.Tensor,
                       down: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
                       down_bias: torch.Tensor | None = None, act: Activation = SILU
                       ) -> torch.Tensor:
    """`grouped_swiglu` one expert at a time: its reference, and the "dense" kernel."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(swiglu(x[start:start + n], gate_up[e], down[e],
                               None if gate_up_bias is None else gate_up_bias[e],
                               None if down_bias is None else down_bias[e], act))
        start += n
    return torch.cat(outs) if outs else x.new_empty(0, down.shape[1])


def swiglu_cpu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
               act: Activation = SILU) -> torch.Tensor:
    """`swiglu` (no biases) for the CPU worker: on the fused expert kernel up to its
    crossover in rows, else on torch's backend for the rows."""
    if (act == SILU and x.shape[0] <= kernel_choice().expert_limit(x.dtype)
            and kernel_takes(x, gate_up, down)):
        return kernels.expert_ffn(x.contiguous(), [x.shape[0]], gate_up[None], down[None])
    rows_per_weight(x.shape[0])
    return swiglu(x, gate_up, down, act=act)


def swiglu_batches_cpu(xs: list[torch.Tensor], counts: list[list[int]], group: ExpertGroup,
                       scale: torch.Tensor | None = None, kernel: str | None = None
                       ) -> torch.Tensor:
    """Batches of rows, each sorted by expert: xs [n_b, D], counts [batch][G] rows per
    expert, scale [sum n_b] (each row's routed weight) or None -> every row's output
    [sum n_b, D], scaled, batches in order. CPU worker only (it picks torch's process-wide
    matmul backend). Up to the kernels' crossover in mean rows per expert, one fused kernel
    call (moeflow.ops.cpu.expert_ffn); beyond it, or with biases or GPT-OSS's activation,
    torch's loop or padded bmm. `kernel` "grouped" or "dense" overrides the crossover."""
    per_expert = counts[0] if len(counts) == 1 else [sum(c) for c in zip(*counts)]
    x = xs[0] if len(xs) == 1 else torch.cat(xs)  # [n, D]
    if (kernel != "dense" and group.act == SILU and group.gate_up_bias is None
            and group.down_bias is None
            and (kernel == "grouped" and kernels.available()
                 or mean_rows(per_expert) <= kernel_choice().expert_limit(x.dtype))
            and kernel_takes(x, group.gate_up, group.down)):
        if scale is not None and scale.dtype != torch.float32:
            scale = scale.float()
        return kernels.expert_ffn(x.contiguous(), per_expert, group.gate_up, group.down,
                                  None if len(xs) == 1 else index_tensor(_expert_major(counts)),
                                  None if scale is None else scale.contiguous())
    order = _expert_major(counts)  # rows of x, expert by expert
    y = _swiglu_batches_torch(x, order, len(xs) > 1, per_expert, group, kernel)
    return y if scale is None else y.mul_(scale.to(y.dtype)[:, None])  # in the model dtype


def _swiglu_batches_torch(x: torch.Tensor, order: list[int], merged: bool,
                          per_expert: list[int], group: ExpertGroup, kernel: str | None = None
                          ) -> torch.Tensor:
    if kernel != "dense" and padded_experts_pay(per_expert, group.bytes_per_expert):
        width = max(per_expert)
        src, dest = _padded_layout(order, per_expert, width)
        index = index_tensor(src + dest)
        batched_gemms()
        y = padded_swiglu(x.index_select(0, index[:len(src)]).view(len(per_expert), width, -1),
                          group.gate_up, group.down, group.gate_up_bias, group.down_bias,
                          group.act)  # [G, M, D]
        return y.view(len(src), -1).index_select(0, index[len(src):])
    if merged:
        index = index_tensor(order + _inverse(order))
        x = x.index_select(0, index[:len(order)])
    outs, row = [], 0
    for (gate_up, down, gate_up_bias, down_bias), n in zip(group.per_expert, per_expert):
        if n:
            rows_per_weight(n)
            outs.append(swiglu(x[row:row + n], gate_up, down, gate_up_bias, down_bias,
                               group.act))
            row += n
    y = outs[0] if len(outs) == 1 else torch.cat(outs)
    return y.index_select(0, index[len(order):]) if merged else y


def swiglu_batches_grouped(xs: list[torch.Tensor], ends: list[torch.Tensor],
                           group: ExpertGroup, kernel: str | None = None) -> torch.Tensor:
    """`swiglu_batches_cpu` as grouped GEMMs, with no host round trip (accelerators); ends
    [batch][G] (int32) cumulative row ends per expert. `kernel` "dense": a dense matmul per
    expert instead (reads the counts on the host)."""
    if kernel == "dense":
        counts = [counts_of(e) for e in ends]
        per_expert = [sum(c) for c in zip(*counts)]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        order = _expert_major(counts)
        merged = len(xs) > 1
        if merged:
            index = index_tensor(order + _inverse(order)).to(x.device)
            x = x.index_select(0, index[:len(order)])
        y = grouped_swiglu_ref(x, per_expert, group.gate_up, group.down, group.gate_up_bias,
                               group.down_bias, group.act)
        return y.index_select(0, index[len(order):]) if merged else y
    if len(xs) == 1:
        return grouped_swiglu(xs[0], ends[0], group.gate_up, group.down, group.gate_up_bias,
                              group.down_bias, group.act)
    # merge the batches so that each expert's rows are contiguous
    counts = [torch.diff(e, prepend=e.new_zeros(1)) for e in ends]
    expert_of_row = torch.cat([
        torch.repeat_interleave(torch.arange(len(c), device=c.device), c) for c in counts])
    perm = torch.argsort(expert_of_row, stable=True)
    merged_ends = torch.stack(counts).sum(0).cumsum(0, dtype=torch.int32)
    y = grouped_swiglu(torch.cat(xs)[perm], merged_ends, group.gate_up, group.down,
                       group.gate_up_bias, group.down_bias, group.act)
    unsorted = torch.empty_like(y)
    unsorted[perm] = y
    return unsorted


def mean_rows(per_expert: list[int]) -> float:
    """Rows per expert among the experts with rows (what the kernel choice compares with
    its crossover: the GEMMs' work, not their busiest expert's)."""
    active = sum(1 for n in per_expert if n)
    return sum(per_expert) / active if active else 0.0


def counts_of(ends: torch.Tensor) -> list[int]:
    """Cumulative row ends [G] -> rows per expert."""
    ends_list = ends.tolist()
    return [b - a for a, b in zip([0, *ends_list], ends_list)]


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
