"""Align (token, expert) pairs by expert, so that each BLOCK_M rows of the grouped GEMMs
belong to one expert.

Shapes: T tokens, A top-k, P = T·A pairs (pair p is token p // A, slot p % A), E experts
held here, BM = BLOCK_M, C = cdiv(P, BLOCK_P) chunks of pairs, R rows after padding, at most
`max_rows(P, E, BM)` = P + min(E + 1, P)·(BM − 1).

A pair whose expert id lies outside [0, E) is *not here* (another rank holds that expert):
it goes to an extra bucket E whose blocks carry expert id -1, and the fused MoE writes zeros
for them. Results, all on the device (nothing here waits on the host):

    sorted_ids  [R_max] int32   pair ids by bucket, ascending within one, each bucket padded
                                to a multiple of BM with the sentinel P (and P after the end)
    expert_ids  [cdiv(R_max, BM)] int32   the expert of each block; -1 for not-here blocks
                                and blocks past the end
    num_rows    [1] int32       R, the rows in use

Three kernels, one pass each, plus a fill of the sentinels:

    _count_kernel    grid (C,)  reads the P ids, writes a histogram of each chunk
    _offsets_kernel  grid (1,)  reads the histograms twice: pads each bucket to BM, prefix
                                sums them, writes where each chunk's pairs of each bucket
                                start and the expert of each block
    _scatter_kernel  grid (C,)  re-reads the ids and writes each pair at its start plus its
                                rank among the chunk's earlier pairs of its bucket

Memory traffic: 2·8P bytes of ids, 4·R_max of sorted ids, 3·4·C·(E + 1) of histograms and
starts: a few hundred KB at 4096 tokens, against the GEMMs' megabytes of weights. The order
is deterministic and stable, so `align_by_expert_ref` gives the same arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Alignment(NamedTuple):
    sorted_ids: torch.Tensor  # [R_max] int32
    expert_ids: torch.Tensor  # [cdiv(R_max, BM)] int32
    num_rows: torch.Tensor  # [1] int32


def max_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most rows padding can produce: each non-empty bucket adds at most BM - 1."""
    return num_pairs + min(num_experts + 1, num_pairs) * (block_m - 1)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_pairs, num_experts,
                  BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    offs = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=in_range, other=0)
    buckets = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts).to(tl.int32)
    counts = tl.histogram(buckets, BLOCK_E, mask=in_range)
    tl.store(counts_ptr + chunk * BLOCK_E + tl.arange(0, BLOCK_E), counts)


@triton.jit
def _offsets_kernel(counts_ptr, starts_ptr, expert_ids_ptr, num_rows_ptr,
                    num_chunks, num_experts, num_blocks,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_B: tl.constexpr):
    buckets = tl.arange(0, BLOCK_E)
    totals = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        tile = tl.load(counts_ptr + chunks.to(tl.int64)[:, None] * BLOCK_E + buckets[None, :],
                       mask=chunks[:, None] < num_chunks, other=0)  # [BLOCK_C, BLOCK_E]
        totals += tl.sum(tile, axis=0)
    padded = tl.cdiv(totals, BLOCK_M) * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(num_rows_ptr, tl.sum(padded, axis=0))

    # Each chunk's pairs of a bucket start after the bucket's earlier chunks.
    carry = ends - padded
    for c0 in range(0, num_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        offs = chunks.to(tl.int64)[:, None] * BLOCK_E + buckets[None, :]
        in_range = chunks[:, None] < num_chunks
        tile = tl.load(counts_ptr + offs, mask=in_range, other=0)
        tl.store(starts_ptr + offs, carry[None, :] + tl.cumsum(tile, axis=0) - tile,
                 mask=in_range)
        carry += tl.sum(tile, axis=0)

    # A block's bucket is the number of buckets that end at or before its first row.
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        first_rows = blocks * BLOCK_M
        bucket = tl.sum((ends[None, :] <= first_rows[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, tl.where(bucket < num_experts, bucket, -1),
                 mask=blocks < num_blocks)


@triton.jit
def _scatter_kernel(ids_ptr, starts_ptr, sorted_ids_ptr, num_pairs, num_experts,
                    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_P)
    offs = chunk * BLOCK_P + lanes
    in_range = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=in_range, other=0)
    buckets = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts).to(tl.int32)
    # Lanes past the end come last, so they never count towards a real pair's rank.
    earlier_same = (buckets[:, None] == buckets[None, :]) & (lanes[None, :] < lanes[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)  # [BLOCK_P]
    start = tl.load(starts_ptr + chunk * BLOCK_E + buckets, mask=in_range, other=0)
    tl.store(sorted_ids_ptr + start.to(tl.int64) + rank, offs.to(tl.int32), mask=in_range)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """topk_ids [T, A] (any integer dtype) -> Alignment for E = `num_experts`, BM = `block_m`.

    Sizes come from P, E and BM alone, so the result needs no host sync."""
    if topk_ids.dim() != 2 or topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer [T, A] tensor, got "
                         f"{topk_ids.dtype} {tuple(topk_ids.shape)}")
    if num_experts < 1 or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"need num_experts >= 1 and a power-of-two block_m, "
                         f"got {num_experts}, {block_m}")
    ids = topk_ids.reshape(-1).contiguous()  # [P]
    num_pairs, device = ids.numel(), ids.device
    if num_pairs >= 2**31 - 1:
        raise ValueError(f"{num_pairs} pairs do not fit int32 row ids")
    rows = max_rows(num_pairs, num_experts, block_m)
    num_blocks = triton.cdiv(rows, block_m)
    sorted_ids = torch.full((rows,), num_pairs, dtype=torch.int32, device=device)
    expert_ids = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
    num_rows = torch.zeros(1, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return Alignment(sorted_ids, expert_ids, num_rows)

    block_p = max(16, min(64, triton.next_power_of_2(num_pairs)))
    block_e = max(16, triton.next_power_of_2(num_experts + 1))  # + the not-here bucket
    num_chunks = triton.cdiv(num_pairs, block_p)
    counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=device)  # [C, E+1..]
    starts = torch.empty_like(counts)
    tile = max(1, 4096 // block_e)
    _count_kernel[(num_chunks,)](ids, counts, num_pairs, num_experts,
                                 BLOCK_P=block_p, BLOCK_E=block_e)
    _offsets_kernel[(1,)](counts, starts, expert_ids, num_rows, num_chunks, num_experts,
                          num_blocks, BLOCK_M=block_m, BLOCK_C=min(tile, 64),
                          BLOCK_E=block_e, BLOCK_B=max(16, tile))
    _scatter_kernel[(num_chunks,)](ids, starts, sorted_ids, num_pairs, num_experts,
                                   BLOCK_P=block_p, BLOCK_E=block_e)
    return Alignment(sorted_ids, expert_ids, num_rows)


def align_by_expert_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Reference for `align_by_expert`, in Python lists (tests only). Its arrays stop at R
    rows and R / BM blocks; the kernel's continue with sentinels up to its upper bound."""
    ids = topk_ids.reshape(-1).tolist()
    num_pairs = len(ids)
    buckets = [e if 0 <= e < num_experts else num_experts for e in ids]
    sorted_ids: list[int] = []
    expert_ids: list[int] = []
    for bucket in range(num_experts + 1):
        pairs = [p for p, b in enumerate(buckets) if b == bucket]
        padding = -len(pairs) % block_m
        sorted_ids += pairs + [num_pairs] * padding
        expert = bucket if bucket < num_experts else -1
        expert_ids += [expert] * ((len(pairs) + padding) // block_m)
    return Alignment(torch.tensor(sorted_ids, dtype=torch.int32),
                     torch.tensor(expert_ids, dtype=torch.int32),
                     torch.tensor([len(sorted_ids)], dtype=torch.int32))
