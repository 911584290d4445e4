"""A paged KV cache for the sequences one device serves.

Tokens live in fixed-size blocks of a per-layer pool; each sequence owns a list of blocks
(its block table). The pool starts small and doubles when it runs out, up to
`max_tokens`; past that, `reserve` raises KVCacheFull and nothing is changed.

Per layer the pool is [slots, W] with W the cached width of one token: K and V of every
key/value head for GQA, the compressed latent plus rope key for MLA. Pools live on the
worker's device (a CPU's, once 2 MiB or more, on memory advised for huge pages, as the
weights: `moeflow.models.weights.host_empty`); slot indices are computed on the CPU and
moved once per unit.

A decode step reads whole blocks: `block_table` lays a batch's block tables out padded,
and `read_blocks` gathers them, with no per-token index to build.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.models.weights import host_empty
from moeflow.ops.backend import index_tensor

DEFAULT_BLOCK_SIZE = 16


class KVCacheFull(RuntimeError):
    """The device has no room for the tokens asked for."""


@dataclass
class SeqBlocks:
    blocks: list[int]
    length: int = 0


class PagedKVCache:
    def __init__(self, num_layers: int, width: int, dtype: torch.dtype, max_tokens: int,
                 block_size: int = DEFAULT_BLOCK_SIZE, initial_tokens: int = 1024,
                 device: torch.device | None = None) -> None:
        if max_tokens < block_size:
            raise ValueError(f"max_tokens={max_tokens} is below one block ({block_size})")
        self.num_layers = num_layers
        self.width = width
        self.dtype = dtype
        self.device = device or torch.device("cpu")
        self.block_size = block_size
        self.max_blocks = max_tokens // block_size
        self.num_blocks = 0
        self.pools: list[torch.Tensor] = [torch.empty(0, width, dtype=dtype, device=self.device)
                                          for _ in range(num_layers)]
        self.blocked: list[torch.Tensor] = []  # the pools as [blocks, block_size, W]
        self.free_blocks: list[int] = []
        self.seqs: dict[int, SeqBlocks] = {}
        self._grow(min(self.max_blocks, max(1, initial_tokens // block_size)))

    @property
    def capacity_tokens(self) -> int:
        return self.max_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can still be handed out, counting those the pool may grow into."""
        return len(self.free_blocks) + self.max_blocks - self.num_blocks

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def _grow(self, num_blocks: int) -> None:
        old = self.num_blocks
        if num_blocks <= old:
            return
        slots = num_blocks * self.block_size
        for layer, pool in enumerate(self.pools):
            if self.device.type == "cpu":  # on huge pages when large: decode attention reads
                # each sequence's blocks wherever they lie, a TLB miss per 4 KiB otherwise
                grown = host_empty((slots, self.width), self.dtype).zero_()
            else:
                grown = torch.zeros(slots, self.width, dtype=self.dtype, device=self.device)
            grown[: pool.shape[0]] = pool
            self.pools[layer] = grown
        self.blocked = [p.view(-1, self.block_size, self.width) for p in self.pools]
        self.free_blocks.extend(range(num_blocks - 1, old - 1, -1))
        self.num_blocks = num_blocks

    def blocks_needed(self, seq_id: int, new_length: int) -> int:
        have = len(self.seqs[seq_id].blocks) if seq_id in self.seqs else 0
        return max(0, -(-new_length // self.block_size) - have)

    def can_reserve(self, needs: dict[int, int]) -> bool:
        """Whether every sequence in `needs` (seq id -> new total length) fits at once."""
        return sum(self.blocks_needed(s, n) for s, n in needs.items()) <= self.num_free_blocks

    def reserve(self, seq_id: int, start: int, num_tokens: int) -> torch.Tensor:
        """Room for positions start..start+num_tokens-1 of `seq_id` (which must hold exactly
        `start` tokens). Returns their slot indices [num_tokens]."""
        return index_tensor(self.reserve_slots(seq_id, start, num_tokens))

    def reserve_slots(self, seq_id: int, start: int, num_tokens: int) -> list[int]:
        """`reserve`, with the slot indices as Python ints."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            if start != 0:
                raise KeyError(f"sequence {seq_id} is not cached here; it cannot resume at "
                               f"position {start}")
            seq = SeqBlocks([])
        elif seq.length != start:
            raise ValueError(f"sequence {seq_id} holds {seq.length} tokens, not {start}")
        length = start + num_tokens
        need = self.blocks_needed(seq_id, length)
        if need > len(self.free_blocks):
            if need > self.num_free_blocks:
                raise KVCacheFull(
                    f"KV cache full: sequence {seq_id} needs {need} more blocks of "
                    f"{self.block_size} tokens, {len(self.free_blocks)} free of {self.max_blocks}")
            self._grow(min(self.max_blocks, max(2 * self.num_blocks,
                                                self.used_blocks + need)))
        for _ in range(need):
            seq.blocks.append(self.free_blocks.pop())
        seq.length = length
        self.seqs[seq_id] = seq
        return self.slot_list(seq_id, start, length)

    def slot_list(self, seq_id: int, start: int, end: int) -> list[int]:
        """Slot indices of positions start..end-1 of `seq_id` (a unit's new tokens)."""
        blocks, size = self.seqs[seq_id].blocks, self.block_size
        return [blocks[p // size] * size + p % size for p in range(start, end)]

    def block_table(self, seq_ids: list[int]) -> tuple[list[int], int]:
        """The block tables of a batch of sequences, each padded (with block 0) to the
        longest: [B * width] block ids, and that width."""
        tables = [self.seqs[s].blocks for s in seq_ids]
        width = max(len(t) for t in tables)
        return [b for t in tables for b in (*t, *[0] * (width - len(t)))], width

    def write(self, layer: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        """values [n, W] into slots [n] of `layer`."""
        if values.dtype != self.dtype:
            values = values.to(self.dtype)
        self.pools[layer].index_copy_(0, slots, values)

    def read_blocks(self, layer: int, blocks: torch.Tensor, num_seqs: int) -> torch.Tensor:
        """blocks [B * n] of block ids (from `block_table`) -> their slots [B, n * block, W],
        position p of sequence b at [b, p]"""
        return self.blocked[layer].index_select(0, blocks).view(num_seqs, -1, self.width)

    def rollback(self, seq_id: int, start: int) -> None:
        """Undo a reservation from `start` on: the sequence's KV ends there again (and is
        freed if it started there)."""
        if start == 0:
            self.free(seq_id)
        elif seq_id in self.seqs:
            self.seqs[seq_id].length = start

    def free(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self.free_blocks.extend(reversed(seq.blocks))

    def length(self, seq_id: int) -> int:
        seq = self.seqs.get(seq_id)
        return 0 if seq is None else seq.length
