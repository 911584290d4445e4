"""DeviceWorker: one device's share of a model, and the ops that run each node kind on it.

A worker holds the dense weights (if it serves requests), the routed experts it owns, and
the KV cache of the sequences homed on it. `run(key, graph, node, inputs)` executes one graph
node with real ops, reading its inputs by role (`Inputs`), never by edge order, on the op its
kind names (`_run_<kind>`, moeflow.dataflow.kinds); `key` names the unit in flight (several
may be in flight at once), whose per-unit state `begin` prepared: its tokens, cache slots,
RoPE tables and KV block tables, so that a decode step's nodes do little more than their
GEMMs. Nodes coalesced from several units run as one: units that only decode share one
attention batch, merged once for every layer, and one routing sort.

The values flowing along data edges are in `values.py`.

Shapes: T tokens homed here, D hidden, A top-k, N = T*A routed rows, H/K query/kv heads,
d head dim, V vocab, E experts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F

from moeflow.actors.kvcache import PagedKVCache
from moeflow.actors.values import (
    AttnOut, ExpertOut, Inputs, Logits, Page, Partial, PreOut, Routing, Rows,
)
from moeflow.dataflow.graph import (
    Attention,
    Combine,
    Embed,
    Expert,
    Gate,
    Graph,
    LMHead,
    Node,
    Placement,
    Transfer,
    Unit,
    dispatch_groups,
)
from moeflow.dataflow.kinds import KINDS
from moeflow.dataflow.offload import page_columns
from moeflow.models.spec import ModelSpec
from moeflow.models.weights import DenseWeights, ExpertStack, to_device
from moeflow.ops.attention import decode_attention, decode_mask, prefill_attention
from moeflow.ops import cpu as kernels
from moeflow.ops.cpu.choice import kernel_choice, kernel_takes, linear as cpu_linear
from moeflow.ops.backend import (
    SERIAL_ROWS, OneThread, batched_gemms, index_tensor, keep_freed_memory, onednn_enabled,
    rows_per_weight, use_onednn,
)
from moeflow.ops.experts import (
    SILU, Activation, ExpertGroup, swiglu, swiglu_batches_cpu, swiglu_batches_grouped,
    swiglu_cpu,
)
from moeflow.ops.norm import rms_norm
from moeflow.ops.rope import RopeTable, apply_half_rotation, apply_rope
from moeflow.ops.router import norm_eps, route, router_logits

_NO_ROWS = torch.empty(0, dtype=torch.long)  # combine's tokens when no routed rows came
MLA_NORM_EPS = 1e-6  # DeepSeek's latent norms use their class default, not rms_norm_eps


@dataclass
class _Decode:
    """The sequences of a batch that decode one new token each. Their KV cache is read as
    whole blocks, cut to the longest sequence."""

    seq_ids: list[int]
    lengths: list[int]  # [B] keys each sequence sees, its new token's included
    rows: torch.Tensor | None  # [B] their rows among the batch's tokens; None: all, in order
    blocks: torch.Tensor  # [B * W] block ids, each sequence's table padded to W blocks
    masks: dict[int | None, torch.Tensor | None]  # per sliding window: decode_mask


@dataclass
class _Batch:
    """What attention needs for a set of new tokens: one unit's homed here, or a coalesced
    group of units that only decode (merged once, used by every layer)."""

    slots: torch.Tensor  # [T] cache slots of the new tokens
    cos: torch.Tensor | None  # [T, R/2] fp32, for interleaved rope (MLA)
    sin: torch.Tensor | None
    half_cos: torch.Tensor | None  # [T, 1, R] in the model dtype, for half rotation
    half_sin: torch.Tensor | None
    decode: _Decode | None
    prefill: list[tuple[int, int, int, int]] = field(default_factory=list)  # row0, n, start, seq

    @property
    def all_decode(self) -> bool:
        return not self.prefill and self.decode is not None and self.decode.rows is None


@dataclass
class _UnitState:
    unit: Unit
    rows: dict[int, tuple[int, int]]  # seq index -> (first row, num rows) among rows laid out here
    token_ids: torch.Tensor  # [T]
    batch: _Batch
    seqs: tuple[int, ...] = ()  # the sequences laid out here, in row order
    kv: bool = True  # whether their KV cache is here
    positions: torch.Tensor | None = None  # [T] (CPU)
    slots: torch.Tensor | None = None  # [T] (CPU)
    # micro-batches: sequences -> (their rows among the unit's, their batch)
    subs: dict[tuple[int, ...], tuple[torch.Tensor, _Batch]] = field(default_factory=dict)


Item = tuple[Any, Graph, Node, Inputs]  # a node to run: its unit's key, graph, node, inputs


class DeviceWorker:
    def __init__(self, device: str, spec: ModelSpec, dtype: torch.dtype,
                 dense: DenseWeights | None, experts: dict[int, ExpertStack],
                 kv_tokens: int = 65536) -> None:
        self.device = device
        self.tdevice = torch_device_of(device)
        # asked at every node: torch's device.type builds a string each time (~0.4 us hot,
        # a few us with its code cold between decode kernels)
        self._cpu = self.tdevice.type == "cpu"
        self.spec = spec
        self.dtype = dtype
        self.dense = dense
        self.experts = experts
        if not self._cpu:
            if dense is not None:
                to_device(dense, self.tdevice)
            for stack in experts.values():
                to_device(stack, self.tdevice)
        self.rope = RopeTable(spec.rope, min(spec.max_position_embeddings, 4096))
        self.kv = PagedKVCache(spec.num_layers, spec.attention.cache_width, dtype, kv_tokens,
                               device=self.tdevice)
        self._windows = {layer.sliding_window for layer in spec.layers}
        self._units: dict[Any, _UnitState] = {}
        self._groups: dict[tuple[Any, ...], _Batch] = {}  # merged decode batches, by unit keys
        self._ranks: dict[Placement, tuple[torch.Tensor, dict[int, int], bool]] = {}
        # a dispatch's experts by destination, by (placement, destinations, experts)
        self._dispatch_groups: dict[tuple[Placement, tuple[str, ...], tuple[int, ...]],
                                    tuple[tuple[int, ...], ...]] = {}
        self._stack_pos: dict[int, dict[int, int]] = {
            layer: {e: j for j, e in enumerate(stack.experts)} for layer, stack in experts.items()}
        self._expert_groups: dict[tuple[int, tuple[int, ...]], ExpertGroup] = {}
        self._paged: tuple[Any, list[Page], ExpertGroup] | None = None  # last paged layer
        # (layer, dtype) -> whether the kernels take that layer's attention weights and cache
        # (asked once: 10 tensors' checks cost ~4 us a layer at every decode step)
        self._fusable: dict[tuple[int, torch.dtype], bool] = {}
        if self._cpu:
            kernel_choice()  # loads (or builds) the CPU kernels now, not in the first step
            keep_freed_memory()  # no page fault per page of each step's large tensors
        # the routing bookkeeping (dispatch order, combine) in one kernel call each
        self._cpu_ops = self._cpu and kernels.available()
        # each kind's op, as its declaration names it
        self._ops = {cls: getattr(self, kind.op) for cls, kind in KINDS.items()}

    def _gemm_rows(self, rows: int, weight: torch.Tensor | None = None) -> None:
        if self._cpu:
            rows_per_weight(rows, None if weight is None else weight.numel())

    def _linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x [T, K], w [N, K] -> [T, N]; on the CPU, the kernel or torch backend for T rows."""
        return cpu_linear(x, w, bias) if self._cpu else F.linear(x, w, bias)

    def _paged_kernel(self, q: torch.Tensor) -> bool:
        """Whether decode attention reads the paged cache in place (moeflow.ops.cpu)."""
        return (self._cpu and kernel_choice().attention
                and kernel_takes(q[:, 0], self.kv.pools[0]))

    def _prefill_kernel(self, q: torch.Tensor, seen: int, window: int | None,
                        sinks: torch.Tensor | None) -> bool:
        """Whether a GQA prefill's causal attention runs on the CPU kernel (bf16 on AVX-512
        BF16; no sinks, and a window, if any, that hides none of the `seen` keys)."""
        return (self._cpu_ops and kernels.best_isa() >= 2 and q.dtype == torch.bfloat16
                and sinks is None and (window is None or window >= seen)
                and kernel_choice().prefill_attention)

    def _swiglu(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
                ) -> torch.Tensor:
        """A dense MLP or shared expert: x [T, D] -> [T, D]"""
        return swiglu_cpu(x, gate_up, down) if self._cpu else swiglu(
            x, gate_up, down)

    # -- units ---------------------------------------------------------------------

    def begin(self, key: Any, unit: Unit, token_ids: dict[int, list[int]], *,
              seqs: tuple[int, ...] | None = None, kv: bool = True) -> None:
        """Prepare to run `unit` here: lay out the tokens of `seqs` (by default those homed
        on this device) and, with `kv`, reserve their KV cache here. `token_ids` maps seq
        index -> its new token ids. A device that runs a sequence's projections but keeps
        its KV elsewhere (CGOPipe's GPU) lays it out without `kv`; the one that keeps its KV
        and runs the attention core over it (the host) with."""
        seqs = unit.seqs_on(self.device) if seqs is None else tuple(seqs)
        rows, ids, positions, slots = self._reserve(unit, seqs, token_ids, kv)
        num = len(ids)
        flat = index_tensor(ids + positions + slots)  # the three as one tensor [3T]
        batch = self._batch(unit, seqs, rows, flat[num:2 * num], max(positions, default=-1),
                            flat[2 * num:], kv)
        self._units[key] = _UnitState(unit, rows, self._on_device(flat[:num]), batch, seqs, kv,
                                      flat[num:2 * num], flat[2 * num:])

    def _batch(self, unit: Unit, seqs: tuple[int, ...], rows: dict[int, tuple[int, int]],
               positions: torch.Tensor, last: int, slots: torch.Tensor, kv: bool) -> _Batch:
        """The attention batch of `seqs`, laid out in `rows` (CPU positions and slots)."""
        decoding, prefill = [], []  # seq indices; (row0, n, start, seq_id)
        for i in seqs:
            chunk = unit.seqs[i]
            if chunk.num_tokens == 1 and chunk.start > 0:
                decoding.append(i)
            else:
                prefill.append((rows[i][0], chunk.num_tokens, chunk.start, chunk.seq_id))
        decode = None
        if decoding and kv:
            at = None if not prefill else index_tensor([rows[i][0] for i in decoding])
            decode = self._decode([unit.seqs[i].seq_id for i in decoding],
                                  [unit.seqs[i].start + 1 for i in decoding], at)
        cos, sin, half_cos, half_sin = self._rope_tables(positions, last + 1)
        return _Batch(self._on_device(slots), cos, sin, half_cos, half_sin, decode, prefill)

    def _sub(self, key: Any, seqs: tuple[int, ...]) -> tuple[torch.Tensor | None, _Batch]:
        """A micro-batch of a unit: its rows among the unit's (None: all of them) and its
        own attention batch, made once."""
        state = self._units[key]
        if seqs == state.seqs:
            return None, state.batch
        made = state.subs.get(seqs)
        if made is None:
            picks, rows, at = [], {}, 0
            for i in seqs:
                row0, n = state.rows[i]
                picks.extend(range(row0, row0 + n))
                rows[i] = (at, n)
                at += n
            pick = index_tensor(picks)
            positions = state.positions.index_select(0, pick)  # type: ignore[union-attr]
            slots = state.slots.index_select(0, pick) if state.kv else state.slots
            batch = self._batch(state.unit, seqs, rows, positions, int(positions.max()),
                                slots, state.kv)  # type: ignore[arg-type]
            made = state.subs[seqs] = (self._on_device(pick), batch)
        return made

    def _reserve(self, unit: Unit, seqs: tuple[int, ...], token_ids: dict[int, list[int]],
                 kv: bool = True
                 ) -> tuple[dict[int, tuple[int, int]], list[int], list[int], list[int]]:
        """KV room for the sequences' new tokens (with `kv`): their rows, token ids,
        positions and cache slots (none without `kv`). Nothing is reserved if any of them
        cannot be."""
        rows: dict[int, tuple[int, int]] = {}
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        reserved: list[int] = []
        try:
            for i in seqs:
                chunk = unit.seqs[i]
                tokens = token_ids[i]
                if len(tokens) != chunk.num_tokens:
                    raise ValueError(f"sequence {chunk.seq_id}: {len(tokens)} token ids for "
                                     f"{chunk.num_tokens} new tokens")
                rows[i] = (len(ids), chunk.num_tokens)
                ids.extend(tokens)
                positions.extend(range(chunk.start, chunk.start + chunk.num_tokens))
                if kv:
                    slots.extend(self.kv.reserve_slots(chunk.seq_id, chunk.start,
                                                       chunk.num_tokens))
                    reserved.append(chunk.seq_id)
        except Exception:
            for seq_id in reserved:  # leave the cache as it was
                chunk = next(c for c in unit.seqs if c.seq_id == seq_id)
                self.kv.rollback(seq_id, chunk.start)
            raise
        return rows, ids, positions, slots

    def _rope_tables(self, positions: torch.Tensor, end: int
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                torch.Tensor | None]:
        """positions [T] (CPU, all below `end`) -> cos, sin [T, R/2] (interleaved rope and
        MLA) or half_cos, half_sin [T, 1, R] (half rotation), the other two None"""
        if self.spec.rope.interleaved or self.spec.attention.kind == "mla":
            cos, sin = self.rope.cos_sin(positions, end)
            return self._on_device(cos), self._on_device(sin), None, None
        half_cos, half_sin = self.rope.half_tables(positions, self.dtype, end)
        return None, None, self._on_device(half_cos), self._on_device(half_sin)

    def _decode(self, seq_ids: list[int], lengths: list[int], rows: torch.Tensor | None
                ) -> _Decode:
        blocks, _ = self.kv.block_table(seq_ids)
        if min(lengths) == max(lengths) and all(w is None or w >= lengths[0]
                                                for w in self._windows):
            masks = dict.fromkeys(self._windows)  # nothing is hidden from any sequence
        else:
            lengths_t = self._on_device(index_tensor(lengths))
            masks = {w: decode_mask(lengths_t, w) for w in self._windows}
        return _Decode(seq_ids, lengths, None if rows is None else self._on_device(rows),
                       self._on_device(index_tensor(blocks)), masks)

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if self._cpu else t.to(self.tdevice)

    def _group_batch(self, keys: list[Any]) -> _Batch | None:
        """The batch of a group of units: a unit's own, or, when several units all only
        decode, their merged batch (made once, for every layer); None otherwise."""
        if len(keys) == 1:
            return self._units[keys[0]].batch
        group = tuple(keys)
        merged = self._groups.get(group)
        if merged is None:
            batches = [self._units[k].batch for k in keys]
            if not all(b.all_decode for b in batches):
                return None
            merged = self._groups[group] = self._merge(batches)
        return merged

    def _merge(self, batches: list[_Batch]) -> _Batch:
        def cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if parts[0] is None else torch.cat(parts)  # type: ignore[arg-type]

        decodes = [b.decode for b in batches if b.decode is not None]
        return _Batch(torch.cat([b.slots for b in batches]), cat([b.cos for b in batches]),
                      cat([b.sin for b in batches]), cat([b.half_cos for b in batches]),
                      cat([b.half_sin for b in batches]),
                      self._decode([s for d in decodes for s in d.seq_ids],
                                   [n for d in decodes for n in d.lengths], None))

    def end(self, key: Any) -> None:
        self._units.pop(key, None)
        self._forget_groups(key)
        self._paged = None  # the last paged layer's stack: a unit ended

    def abort(self, key: Any) -> None:
        """Forget a unit that will not finish, rolling its sequences' KV back."""
        state = self._units.pop(key, None)
        self._forget_groups(key)
        self._paged = None
        if state is None or not state.kv:
            return
        for i in state.rows:
            chunk = state.unit.seqs[i]
            self.kv.rollback(chunk.seq_id, chunk.start)

    def _forget_groups(self, key: Any) -> None:
        if self._groups:
            self._groups = {g: b for g, b in self._groups.items() if key not in g}

    def release(self, seq_id: int) -> None:
        """Free a finished sequence's KV cache."""
        self.kv.free(seq_id)

    # -- nodes ---------------------------------------------------------------------

    def run(self, key: Any, graph: Graph, node: Node, inputs: Inputs) -> Any:
        return self.run_group([(key, graph, node, inputs)])[0]

    def run_group(self, items: list[tuple[Any, Graph, Node, Inputs]],
                  kernel: str | None = None) -> list[Any]:
        """Run nodes coalesced into one kernel (same kind and layer, same weights, from
        different units): each GEMM reads its weights once for all of them. A single item
        is the plain case. Returns each item's value. `kernel`: routed experts' kernel as
        the scheduler's on_routing chose it ("grouped" or "dense"), or None.

        On the CPU a node's GEMMs pick torch's matmul backend by rows, through its
        process-wide oneDNN switch; the switch is put back as it was after the node, so
        other torch code in the process (a model of the user's beside moeflow.LLM) does
        not run with the node's choice (transformers' bf16 prefill left without oneDNN
        ran 4.4x slower)."""
        if not self._cpu:
            return self._run_group(items, kernel)
        onednn = onednn_enabled()
        try:
            return self._run_group(items, kernel)
        finally:
            use_onednn(onednn)

    def _run_group(self, items: list[Item], kernel: str | None) -> list[Any]:
        """The group on the op its kind names (moeflow.dataflow.kinds)."""
        op = self._ops.get(type(items[0][2]))
        if op is None:
            raise TypeError(f"cannot run node {items[0][2]!r}")
        return op(items, kernel)  # type: ignore[no-any-return]

    # each kind's op, as KINDS names it: a group of (key, graph, node, inputs) -> values

    def _run_experts(self, items: list[Item], kernel: str | None) -> list[Any]:
        node = items[0][2]
        assert isinstance(node, Expert)
        if node.kind == "routed":
            routed = [(g, n, inputs) for _, g, n, inputs in items]
            return self._routed(routed, kernel)  # type: ignore[arg-type]
        return self._dense_mlp(node, [inputs["attn"][0][1].xn for _, _, _, inputs in items])

    def _run_attention(self, items: list[Item], kernel: str | None) -> list[Any]:
        node = items[0][2]
        assert isinstance(node, Attention)
        if node.part != "full":
            return [self._attention_part(k, n, inputs, g.micro_batched)  # type: ignore[arg-type]
                    for k, g, n, inputs in items]
        micro = [self._sub(k, n.seqs)[1] if g.micro_batched  # type: ignore[union-attr]
                 else self._units[k].batch for k, g, n, _ in items] \
            if any(g.micro_batched for _, g, _, _ in items) else None
        return self._attention(node.layer, [k for k, _, _, _ in items],
                               [inputs["hidden"][0][1] for _, _, _, inputs in items], micro)

    def _run_lm_heads(self, items: list[Item], kernel: str | None) -> list[Any]:
        return self._lm_head([(self._units[k],
                               n.seqs if g.micro_batched else None,  # type: ignore[union-attr]
                               inputs["hidden"][0][1]) for k, g, n, inputs in items])

    def _run_transfers(self, items: list[Item], kernel: str | None) -> list[Any]:
        node = items[0][2]
        assert isinstance(node, Transfer)
        if node.payload == "pin":
            return [_pinned(self._page(t.layer, t.experts, t.part))
                    for t in (n for _, _, n, _ in items) if isinstance(t, Transfer)]
        if node.payload == "weights":  # from the relay
            return [inputs["pinned"][0][1] for _, _, _, inputs in items]
        with self._serial(items):
            return [self._transfer(g, n, inputs)  # type: ignore[arg-type]
                    for _, g, n, inputs in items]

    def _run_gates(self, items: list[Item], kernel: str | None) -> list[Any]:
        with self._serial(items):
            return self._gate(items[0][1], items[0][2],  # type: ignore[arg-type]
                              [inputs["attn"][0][1] for _, _, _, inputs in items])

    def _run_combines(self, items: list[Item], kernel: str | None) -> list[Any]:
        with self._serial(items):
            return [self._combine(n, inputs)  # type: ignore[arg-type]
                    for _, _, n, inputs in items]

    def _run_embeds(self, items: list[Item], kernel: str | None) -> list[Any]:
        assert self.dense is not None
        out = []
        with self._serial(items):
            for key, graph, node, _ in items:
                ids = self._units[key].token_ids
                pick = (self._sub(key, node.seqs)[0]  # type: ignore[union-attr]
                        if graph.micro_batched else None)
                out.append(F.embedding(ids if pick is None else ids.index_select(0, pick),
                                       self.dense.embed))
        return out

    def _serial(self, items: list[Item]) -> OneThread:
        """Small ops over few rows (a decode's) run on one thread."""
        rows = sum(_rows_of(inputs) if inputs else len(self._units[k].token_ids)
                   for k, _, _, inputs in items)
        return OneThread(self._cpu and rows <= SERIAL_ROWS)

    def _attention_part(self, key: Any, node: Attention, inputs: Inputs,
                        micro: bool) -> PreOut | AttnOut | torch.Tensor | None:
        """Attention cut in three for a host that keeps the KV cache (CGOPipe):
            pre   hidden [T, D] -> PreOut: input norm, QKV, q/k norms, RoPE
            core  qkv -> [T, H d]: the KV-cache write and attention, where the cache lives
            post  (core's output, PreOut) -> AttnOut: output projection, residual, norm
        or, for whole fresh prompts, in two:
            prefill  hidden [T, D] -> AttnOut with their keys and values (kv [T, 2K d]):
                     all of attention over the prompts' own keys, keeping no cache
            store    kv -> None: written into the cache, where it lives"""
        assert self.dense is not None
        spec, a = self.spec, self.spec.attention
        if a.kind == "mla":
            raise NotImplementedError("MLA attention (DeepSeek-V2/V3) is not cut into parts; "
                                      "keep it whole on the GPU")
        w = self.dense.layers[node.layer].attn
        batch = self._sub(key, node.seqs)[1] if micro else self._units[key].batch
        if node.part == "pre":
            hidden = inputs["hidden"][0][1]
            x = rms_norm(hidden, w.input_norm, spec.rms_norm_eps)
            q, k, v = self._gqa_qkv(batch, node.layer, self._linear(x, w.qkv, w.qkv_bias))
            return PreOut(hidden, torch.cat((q.flatten(1), k.flatten(1), v.flatten(1)), dim=1))
        if node.part == "prefill":
            hidden = inputs["hidden"][0][1]
            x = rms_norm(hidden, w.input_norm, spec.rms_norm_eps)
            q, k, v = self._gqa_qkv(batch, node.layer, self._linear(x, w.qkv, w.qkv_bias))
            kv = torch.cat((k, v), dim=1).flatten(1)  # [T, 2K d], as the cache holds them
            out = self._attend(batch, node.layer, q, (k, v), None, a.softmax_scale,
                               paged=a.num_kv_heads).flatten(1)
            resid = hidden + self._linear(out, w.o, w.o_bias)
            return AttnOut(resid, rms_norm(resid, w.post_norm, spec.rms_norm_eps), kv)
        if node.part == "store":
            self.kv.write(node.layer, batch.slots, inputs["kv"][0][1])
            return None
        if node.part == "core":
            qkv = inputs["qkv"][0][1]
            q, k, v = qkv.split([a.q_width, a.kv_width, a.kv_width], dim=1)
            return self._gqa_attend(batch, node.layer, q.unflatten(1, (a.num_heads, -1)),
                                    k.unflatten(1, (a.num_kv_heads, -1)),
                                    v.unflatten(1, (a.num_kv_heads, -1)))
        out, pre = inputs["core"][0][1], inputs["pre"][0][1]
        resid = pre.hidden + self._linear(out, w.o, w.o_bias)
        return AttnOut(resid, rms_norm(resid, w.post_norm, spec.rms_norm_eps))

    def _page(self, layer: int, experts: tuple[int, ...], part: tuple[int, int] = (0, 1)
              ) -> Page:
        """Weight page: experts of `layer` this device owns, contiguous in its stack; whole
        (views of the stack), or slice `part` (k, n) of each one's intermediate width
        (`page_columns`), copied out."""
        stack = self.experts[layer]
        first = self._stack_pos[layer][experts[0]]
        if stack.experts[first:first + len(experts)] != experts:
            raise RuntimeError(f"{self.device} holds experts {stack.experts} of layer {layer}: "
                               f"a page of {experts} is not a contiguous run of them")
        rows = slice(first, first + len(experts))
        gate_up, down = stack.gate_up[rows], stack.down[rows]
        gate_up_bias = None if stack.gate_up_bias is None else stack.gate_up_bias[rows]
        down_bias = None if stack.down_bias is None else stack.down_bias[rows]
        if part == (0, 1):
            return Page(experts, gate_up, down, gate_up_bias, down_bias)
        width = down.shape[2]
        start, end = page_columns(part, width)
        gate_up = torch.cat((gate_up[:, start:end], gate_up[:, width + start:width + end]), 1)
        if gate_up_bias is not None:
            gate_up_bias = torch.cat((gate_up_bias[:, start:end],
                                      gate_up_bias[:, width + start:width + end]), 1)
        return Page(experts, gate_up, down[:, :, start:end].contiguous(), gate_up_bias,
                    down_bias, columns=(start, end))

    def _attention(self, layer: int, keys: list[Any], hiddens: list[torch.Tensor],
                   batches: list[_Batch] | None = None) -> list[AttnOut]:
        """Projections once over every unit's rows; attention once over them too when they
        all only decode (a merged batch), else per unit, over its own sequences (or over
        `batches`, each item's micro-batch)."""
        assert self.dense is not None
        spec, a = self.spec, self.spec.attention
        w = self.dense.layers[layer].attn
        hidden = _cat(hiddens)  # [T, D]
        merged = self._group_batch(keys) if batches is None else None
        whole = merged if merged is not None else (
            (self._units[keys[0]].batch if batches is None else batches[0])
            if len(keys) == 1 else None)
        if whole is not None and self._fused_decode(layer, hidden, whole):
            resid, xn = self._fused_attention(layer, hidden, whole)
            return [AttnOut(r, n) for r, n in zip(_split(resid, hiddens), _split(xn, hiddens))]
        x = rms_norm(hidden, w.input_norm, spec.rms_norm_eps)
        if a.kind == "mla":
            q, kv_a = self._mla_project(layer, x)
        else:
            qkv = self._linear(x, w.qkv, w.qkv_bias)  # [T, (H + 2K) d]
        if merged is not None:
            parts = [(merged, slice(None))]
        else:
            parts = [(self._units[k].batch if batches is None else batches[i], rows)
                     for i, (k, rows) in enumerate(zip(keys, _row_slices(hiddens)))]
        outs = [self._mla_core(b, layer, q[rows], kv_a[rows]) if a.kind == "mla"
                else self._gqa_core(b, layer, qkv[rows]) for b, rows in parts]
        resid = hidden + self._linear(_cat(outs), w.o, w.o_bias)
        xn = rms_norm(resid, w.post_norm, spec.rms_norm_eps)
        return [AttnOut(r, n) for r, n in zip(_split(resid, hiddens), _split(xn, hiddens))]

    def _fused_decode(self, layer: int, hidden: torch.Tensor, b: _Batch) -> bool:
        """Whether `_fused_attention` runs this layer for `b`: a CPU with the kernels, a
        batch whose every token decodes, GQA attention with half rotation, no sinks and no
        clipping, and a kernel choice that sends these GEMMs and the attention to the
        kernels (so the result is the unfused path's, bit for bit)."""
        a, w = self.spec.attention, self.dense.layers[layer].attn  # type: ignore[union-attr]
        d = b.decode
        if not (self._cpu_ops and d is not None and d.rows is None and not b.prefill
                and b.half_cos is not None and a.kind != "mla" and a.clip_qkv is None
                and w.sinks is None and a.qk_norm in ("none", "head", "full")):
            return False
        choice = kernel_choice()
        if not (choice.attention and hidden.shape[0] <= choice.linear_limit(hidden.dtype)):
            return False
        fusable = self._fusable.get((layer, hidden.dtype))
        if fusable is None:  # the weights are the layer's for good; a grown pool is alike
            fusable = self._fusable[(layer, hidden.dtype)] = kernel_takes(
                hidden, w.input_norm, w.qkv, w.qkv_bias, w.o, w.o_bias, w.post_norm,
                w.q_norm, w.k_norm, self.kv.pools[layer])
        return fusable and kernel_takes(hidden)

    def _fused_attention(self, layer: int, hidden: torch.Tensor, b: _Batch
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step of the layer's attention in one kernel call (`_fused_decode`
        says when): resid and xn [T, D]."""
        a, eps = self.spec.attention, self.spec.rms_norm_eps
        w = self.dense.layers[layer].attn  # type: ignore[union-attr]
        d = b.decode
        assert d is not None
        normed = a.qk_norm != "none"
        return kernels.attention_decode(
            hidden, w.input_norm, w.qkv, w.qkv_bias, w.q_norm if normed else None,
            w.k_norm if normed else None,
            b.half_cos, b.half_sin, self.kv.pools[layer], b.slots,  # type: ignore[arg-type]
            d.blocks, d.lengths, self.kv.block_size, a.num_heads, a.num_kv_heads,
            self.spec.layers[layer].sliding_window, a.softmax_scale, w.o, w.o_bias,
            w.post_norm, eps)

    def _gqa_core(self, b: _Batch, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [T, (H + 2K) d] of one batch -> attention output [T, H*d]"""
        return self._gqa_attend(b, layer, *self._gqa_qkv(b, layer, qkv))

    def _gqa_qkv(self, b: _Batch, layer: int, qkv: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [T, (H + 2K) d] -> q [T, H, d], k, v [T, K, d]: normed, clipped, rotated"""
        a, eps = self.spec.attention, self.spec.rms_norm_eps
        w = self.dense.layers[layer].attn  # type: ignore[union-attr]
        num_tokens, heads, kv_heads, d = qkv.shape[0], a.num_heads, a.num_kv_heads, a.head_dim
        if a.qk_norm == "full" or a.clip_qkv is not None:
            q, k, v = qkv.split([a.q_width, a.kv_width, a.kv_width], dim=-1)
            if a.qk_norm == "full":
                q, k = rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps)  # type: ignore[arg-type]
            if a.clip_qkv is not None:
                q, k, v = (t.clamp(-a.clip_qkv, a.clip_qkv) for t in (q, k, v))
            qk = torch.cat((q, k), dim=-1).view(num_tokens, heads + kv_heads, d)
            v = v.reshape(num_tokens, kv_heads, d)
        else:
            heads_of = qkv.view(num_tokens, heads + 2 * kv_heads, d)
            qk, v = heads_of[:, :heads + kv_heads], heads_of[:, heads + kv_heads:]
            if a.qk_norm == "head":
                qk = rms_norm(qk, w.qk_norm_heads, eps)  # type: ignore[arg-type]
        if b.half_cos is not None:
            qk = apply_half_rotation(qk, b.half_cos, b.half_sin)  # type: ignore[arg-type]
        else:
            qk = apply_rope(qk, b.cos, b.sin, interleaved=True)  # type: ignore[arg-type]
        return qk[:, :heads], qk[:, heads:], v

    def _gqa_attend(self, b: _Batch, layer: int, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
        """q [T, H, d], k, v [T, K, d] of one batch: written to the cache, attended ->
        [T, H*d]"""
        a = self.spec.attention
        kv_heads, d = a.num_kv_heads, a.head_dim
        self.kv.write(layer, b.slots, torch.cat((k, v), dim=1).flatten(1))  # [T, 2K d]

        def split_kv(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # kv [..., 2K d] -> K, V [..., K, d]
            k, v = kv.unflatten(-1, (2, kv_heads, d)).unbind(-3)
            return k, v

        return self._attend(b, layer, q, (k, v), split_kv, a.softmax_scale,
                            paged=kv_heads).flatten(1)

    def _mla_project(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> q [T, H*(nope+rope)], kv_a [T, kv_lora + rope]"""
        w = self.dense.layers[layer].attn  # type: ignore[union-attr]
        if w.q is not None:
            q = self._linear(x, w.q)
        else:
            q = self._linear(rms_norm(self._linear(x, w.q_a), w.q_a_norm, MLA_NORM_EPS),
                             w.q_b)  # type: ignore[arg-type]
        return q, self._linear(x, w.kv_a)

    def _mla_core(self, b: _Batch, layer: int, q: torch.Tensor,
                  kv_a: torch.Tensor) -> torch.Tensor:
        """One batch's MLA (DeepSeek multi-head latent attention) -> output [T, H*v]"""
        a = self.spec.attention
        w = self.dense.layers[layer].attn  # type: ignore[union-attr]
        q = q.view(q.shape[0], a.num_heads, a.head_dim)
        q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        latent, k_pe = kv_a.split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        latent = rms_norm(latent, w.kv_a_norm, MLA_NORM_EPS)  # type: ignore[arg-type]
        interleaved = self.spec.rope.interleaved  # V3's rope_interleave may turn it off
        q_pe = apply_rope(q_pe, b.cos, b.sin, interleaved)  # type: ignore[arg-type]
        k_pe = apply_rope(k_pe[:, None, :], b.cos, b.sin,  # type: ignore[arg-type]
                          interleaved)[:, 0, :]
        query = torch.cat((q_nope, q_pe), dim=-1)  # [T, H, nope + rope]
        cached = torch.cat((latent, k_pe), dim=-1)  # [T, kv_lora + rope]
        self.kv.write(layer, b.slots, cached)

        def expand(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # c [..., L, kv_lora + rope] -> K [..., L, H, nope + rope], V [..., L, H, v]
            lat, pe = c.split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
            self._gemm_rows(lat.numel() // lat.shape[-1], w.kv_b)
            kv = F.linear(lat, w.kv_b).unflatten(-1, (a.num_heads, -1))
            k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
            pe = pe.unsqueeze(-2).expand(*k_nope.shape[:-1], a.qk_rope_head_dim)
            return torch.cat((k_nope, pe), dim=-1), v

        fresh = expand(cached) if b.prefill else None  # decoding reads them from the cache
        return self._attend(b, layer, query, fresh, expand, a.softmax_scale).flatten(1)

    def _attend(self, b: _Batch, layer: int, q: torch.Tensor,
                fresh: tuple[torch.Tensor, torch.Tensor] | None, unpack: Any,
                scale: float, paged: int | None = None) -> torch.Tensor:
        """q [T, H, d] against each sequence's cached keys; `fresh` are this batch's own
        keys/values [T, K, *] (used directly by sequences that start at position 0; only
        needed if some do). `paged`: the cache holds K (= paged) key heads then K value
        heads of d per slot, which the CPU kernel reads in place for decoding tokens."""
        window = self.spec.layers[layer].sliding_window
        sinks = self.dense.layers[layer].attn.sinks  # type: ignore[union-attr]
        d = b.decode
        out = None
        if d is not None and paged and sinks is None and self._paged_kernel(q):
            qd = q if d.rows is None else q.index_select(0, d.rows)
            res = kernels.paged_decode_attention(
                qd, self.kv.pools[layer], d.blocks, d.lengths, self.kv.block_size, paged,
                window, scale)
            if d.rows is None:
                return res
            out = q.new_empty(q.shape[0], q.shape[1], res.shape[-1])
            out[d.rows] = res
        elif d is not None:
            longest = max(d.lengths)
            with OneThread(self._cpu and d.blocks.numel() <= SERIAL_ROWS):
                cached = self.kv.read_blocks(layer, d.blocks, len(d.lengths))  # [B, W*block, *]
            k, v = unpack(cached if cached.shape[1] == longest else cached[:, :longest])
            mask = d.masks[window]
            if self._cpu:
                batched_gemms()  # the matmul kernel's, and MLA's expansion of the cache
            if d.rows is None:  # every token decodes
                return decode_attention(q, k, v, mask, scale, sinks)
            out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
            out[d.rows] = decode_attention(q.index_select(0, d.rows), k, v, mask, scale, sinks)
        if b.prefill:
            self._gemm_rows(q.shape[0])  # the matmul path's (sinks), not set by the kernels
        for row0, n, start, seq_id in b.prefill:
            if start == 0:
                assert fresh is not None
                k, v = fresh[0][row0:row0 + n], fresh[1][row0:row0 + n]
            else:  # the cache holds the earlier keys and now these
                blocks, _ = self.kv.block_table([seq_id])
                cached = self.kv.read_blocks(layer, self._on_device(index_tensor(blocks)), 1)
                k, v = unpack(cached[0, :start + n])
            if out is None:
                out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
            if paged and self._prefill_kernel(q, start + n, window, sinks):
                out[row0:row0 + n] = kernels.prefill_attention(q[row0:row0 + n], k, v, start,
                                                               scale)
                continue
            out[row0:row0 + n] = prefill_attention(q[row0:row0 + n], k, v, start, scale,
                                                   window, sinks)
        assert out is not None
        return out

    def _ranks_of(self, placement: Placement) -> tuple[torch.Tensor, dict[int, int], bool]:
        """Each expert's rank in the dispatch order [E], the same as a dict, and whether
        that order is the identity."""
        cached = self._ranks.get(placement)
        if cached is None:
            order = placement.dispatch_order()
            rank = {e: r for r, e in enumerate(order)}
            cached = (self._on_device(index_tensor([rank[e] for e in range(len(order))])),
                      rank, order == tuple(range(len(order))))
            self._ranks[placement] = cached
        return cached

    def _gate(self, graph: Graph, node: Gate, attns: list[AttnOut]) -> list[Routing]:
        """Router logits, top-k and the dispatch order once over every item's rows."""
        assert self.dense is not None
        moe = self.spec.moe
        layer = self.dense.layers[node.layer]
        xns = [a.xn for a in attns]
        every = _cat(xns)  # every item's rows
        logits = router_logits(every, layer.router, moe,  # type: ignore[arg-type]
                               layer.router_bias, self._linear)
        if self._cpu_ops and moe.router in kernels.ROUTE_MODES:  # route and sort in one call,
            # and gather the routed rows: each dispatch takes a slice of them
            rank, rank_of, identity = self._ranks_of(graph.placement)
            token, weight, per_rank, ends, rows = kernels.route_dispatch(
                logits, moe.router, moe.top_k, moe.norm_topk_prob, norm_eps(moe),
                moe.routed_scaling_factor, None if identity else rank,
                [x.shape[0] for x in xns], every)
            return self._routings(xns, token, weight, per_rank.tolist(), ends, rank_of,
                                  identity, rows=rows)
        ids, weights = route(logits, moe, layer.score_bias)  # [T, A]
        return self._dispatch(graph.placement, xns, ids, weights)

    def _dispatch(self, placement: Placement, xns: list[torch.Tensor], ids: torch.Tensor,
                  weights: torch.Tensor) -> list[Routing]:
        """ids, weights [T, A] of every item's tokens -> each item's Routing: one stable sort
        by (item, dispatch rank) orders each item's rows as routing it alone would."""
        num_experts, top_k = self.spec.moe.num_experts, self.spec.moe.top_k
        rank, rank_of, identity = self._ranks_of(placement)
        row_rank = ids.view(-1) if identity else rank.index_select(0, ids.view(-1))  # [N]
        sizes = [x.shape[0] for x in xns]
        num_items = len(xns)
        if num_items > 1:  # item i's rows rank after item i-1's
            row_rank = row_rank + self._on_device(index_tensor(
                [i * num_experts for i, n in enumerate(sizes) for _ in range(n * top_k)]))
        if self._cpu_ops:
            order, token, per_rank, ends = kernels.dispatch_order(
                row_rank, num_items * num_experts, num_experts, top_k)
        else:
            order = torch.argsort(row_rank, stable=True)  # [N]
            per_rank = torch.bincount(row_rank, minlength=num_items * num_experts)
            ends = torch.cumsum(per_rank.view(num_items, num_experts), 1, dtype=torch.int32)
            token = order // top_k
        return self._routings(xns, token, weights.view(-1).index_select(0, order),
                              per_rank.tolist(), ends, rank_of, identity, relative=False)

    def _routings(self, xns: list[torch.Tensor], token: torch.Tensor, weight: torch.Tensor,
                  counts: list[int], ends: torch.Tensor, rank_of: dict[int, int],
                  identity: bool, relative: bool = True, rows: torch.Tensor | None = None
                  ) -> list[Routing]:
        """Each item's Routing from the rows of every item in dispatch order: token [N]
        (within its item; without `relative`, among every item's rows), weight [N],
        counts [items * E] and ends (by item, then rank), and the routed rows [N, D] if
        gathered."""
        num_experts, top_k = self.spec.moe.num_experts, self.spec.moe.top_k
        rows_of: list[torch.Tensor | None] = [rows] if rows is not None else [None] * len(xns)
        if len(xns) == 1:
            tokens, weights = [token], [weight]
        else:
            row_sizes = [x.shape[0] * top_k for x in xns]
            tokens, weights = _split(token, row_sizes), _split(weight, row_sizes)
            if rows is not None:
                rows_of = list(_split(rows, row_sizes))
            if not relative:  # each item's tokens from its first row
                sizes = [x.shape[0] for x in xns]
                tokens = [t - first if first else t
                          for t, first in zip(tokens, accumulate([0, *sizes]))]
        if len(xns) == 1 and ends.dim() == 1:  # a kernel's, for one unit: no torch op
            ends_of = [ends]  # (a torch op costs 5-15 us at decode, its code cold)
        else:
            ends_of = list(ends.view(len(xns), num_experts))
        out = []
        for i, xn in enumerate(xns):
            mine = counts[i * num_experts:(i + 1) * num_experts]  # by rank
            by_expert = mine if identity else [mine[rank_of[e]] for e in range(num_experts)]
            out.append(Routing(xn, tokens[i], weights[i], [0, *accumulate(mine)], ends_of[i],
                               tuple(by_expert), rows_of[i]))
        return out

    def _rows(self, graph: Graph, routing: Routing, home: str, group: tuple[int, ...]) -> Rows:
        _, rank, _ = self._ranks_of(graph.placement)
        r0, r1 = rank[group[0]], rank[group[-1]] + 1
        offsets = routing.offsets
        start, end = offsets[r0], offsets[r1]
        whole = r1 - r0 == len(offsets) - 1  # every expert: no slice (a torch op each)
        gathered = routing.rows
        if gathered is not None:
            x = gathered if whole else gathered[start:end]  # [n, D]
        else:
            x = routing.xn.index_select(0, routing.token_of_row if whole
                                        else routing.token_of_row[start:end])
        weights = routing.weight_of_row if whole else routing.weight_of_row[start:end]
        if self._cpu:  # the CPU kernels take counts: from the offsets
            return Rows(home, start, x, None, weights,
                        list(map(operator.sub, offsets[r0 + 1:r1 + 1], offsets[r0:r1])))
        ends = routing.ends if whole else (
            routing.ends[r0:r1] - start if start else routing.ends[r0:r1])
        return Rows(home, start, x, ends, weights)

    def _transfer(self, graph: Graph, node: Transfer, inputs: Inputs) -> Any:
        """A transfer's value: a dispatch's or combine's, a part per destination."""
        (read,) = inputs.values()  # one input, in its payload's role
        value = read[0][1]
        if node.payload == "dispatch":
            groups = self._dispatch_groups.get((graph.placement, node.dsts, node.experts))
            if groups is None:
                groups = self._dispatch_groups[(graph.placement, node.dsts, node.experts)] = \
                    dispatch_groups(node, graph.placement)
            return tuple(self._rows(graph, value, node.src, group) for group in groups)
        if node.payload == "combine":
            return tuple(value.parts[d] for d in node.dsts)
        if node.payload == "qkv":
            return value.qkv
        if node.payload == "kv":
            return value.kv
        return value

    def _routed(self, items: list[tuple[Graph, Expert, Inputs]],
                kernel: str | None = None) -> list[ExpertOut]:
        """The rows every item (unit) sends to these experts, from every home, through the
        experts at once; each item gets back its own rows."""
        node = items[0][1]
        owners: list[int] = []  # the item of each batch
        batches: list[Rows] = []
        pages: list[Page] = []
        for i, (graph, n, inputs) in enumerate(items):
            pages.extend(value for _, value in inputs.get("pages", ()))
            for src, value in inputs["rows"]:
                batches.append(value if isinstance(value, Rows)
                               else self._rows(graph, value, src.device, n.experts))
                owners.append(i)
        sizes = [b.x.shape[0] for b in batches]
        outs: list[ExpertOut] = [ExpertOut({}) for _ in items]
        if sum(sizes) == 0:  # no token chose these experts: a no-op
            for i, b in zip(owners, batches):
                outs[i].parts[b.home] = Partial(b.start, b.x)
            return outs
        group = (self._paged_group(node.layer, node.experts, pages) if pages
                 else self._expert_group(node.layer, node.experts))
        xs, scale = [b.x for b in batches], _cat([b.weights for b in batches])
        if self._cpu:
            y = swiglu_batches_cpu(xs, [b.row_counts() for b in batches], group, scale,
                                   kernel)
        else:
            y = swiglu_batches_grouped(xs, [b.row_ends() for b in batches], group, kernel)
            y.mul_(scale.to(y.dtype)[:, None])  # in the model dtype
        for i, b, part in zip(owners, batches, _split(y, sizes)):
            outs[i].parts[b.home] = Partial(b.start, part)
        return outs

    def _expert_group(self, layer: int, experts: tuple[int, ...]) -> ExpertGroup:
        group = self._expert_groups.get((layer, experts))
        if group is None:
            stack, moe = self.experts[layer], self.spec.moe
            first = self._stack_pos[layer][experts[0]]
            rows = slice(first, first + len(experts))
            group = self._expert_groups[(layer, experts)] = ExpertGroup.of(
                stack.gate_up[rows], stack.down[rows],
                None if stack.gate_up_bias is None else stack.gate_up_bias[rows],
                None if stack.down_bias is None else stack.down_bias[rows],
                SILU if moe.swiglu_limit is None else Activation(moe.swiglu_limit,
                                                                 moe.swiglu_alpha))
        return group

    def _paged_group(self, layer: int, experts: tuple[int, ...], pages: list[Page]
                     ) -> ExpertGroup:
        """`experts` of `layer` from the ones held here and weight pages of the others,
        stacked in the order of `experts`; kept for the layer's next micro-batch (the same
        pages), and only the last layer's."""
        ident = (layer, experts, tuple(id(p) for p in pages))
        if self._paged is not None and self._paged[0] == ident:
            return self._paged[2]
        self._paged = None  # free the last layer's before stacking this one
        paged: dict[int, list[tuple[Page, int]]] = {}  # expert -> (page, index in it)
        for p in pages:
            for j, e in enumerate(p.experts):
                paged.setdefault(e, []).append((p, j))
        own = self.experts.get(layer)
        pos = self._stack_pos.get(layer, {})
        moe = self.spec.moe
        parts: list[tuple[torch.Tensor, ...]] = []
        for e in experts:
            if e in paged:
                parts.append(_expert_from_pages(e, layer, paged[e], moe.intermediate_size))
            elif own is not None and e in pos:
                k = pos[e]
                parts.append(tuple(t[k] for t in (own.gate_up, own.down, own.gate_up_bias,
                                                  own.down_bias) if t is not None))
            else:
                raise RuntimeError(f"{self.device} neither holds expert {e} of layer {layer} "
                                   f"nor received a page of it")
        stacked = [torch.stack(ts) for ts in zip(*parts)]
        biases = stacked[2:] if len(stacked) == 4 else [None, None]
        group = ExpertGroup.of(stacked[0], stacked[1], biases[0], biases[1],
                               SILU if moe.swiglu_limit is None
                               else Activation(moe.swiglu_limit, moe.swiglu_alpha))
        self._paged = (ident, pages, group)
        return group

    def _dense_mlp(self, node: Expert, xns: list[torch.Tensor]) -> list[torch.Tensor]:
        """A dense MLP or shared expert, once over every item's rows."""
        assert self.dense is not None
        lw = self.dense.layers[node.layer]
        xn = _cat(xns)
        if node.kind == "dense":
            out = self._swiglu(xn, lw.dense_gate_up, lw.dense_down)  # type: ignore[arg-type]
        else:
            out = self._swiglu(xn, lw.shared_gate_up, lw.shared_down)  # type: ignore[arg-type]
            if lw.shared_gate is not None:
                self._gemm_rows(xn.shape[0])
                out = torch.sigmoid(F.linear(xn, lw.shared_gate)) * out
        return _split(out, xns)

    def _combine(self, node: Combine, inputs: Inputs) -> torch.Tensor:
        attn: AttnOut = inputs["attn"][0][1]
        routing: Routing | None = inputs["routing"][0][1] if "routing" in inputs else None
        partials: list[Partial] = [  # a routed Expert's own, or a combine Transfer's part
            value.parts[node.device] if isinstance(value, ExpertOut) else value
            for _, value in inputs.get("partials", ())]
        extra: list[torch.Tensor] = [value for _, value in inputs.get("mlp", ())]
        # accumulate in the model dtype, as the families' own implementations do
        rows = token = None
        if routing is not None and partials:
            partials.sort(key=lambda p: p.start)
            rows = partials[0].y if len(partials) == 1 else torch.cat([p.y for p in partials])
            token = routing.token_of_row  # rows in dispatch order
        resid = attn.resid
        if (self._cpu_ops and resid.dim() == 2 and resid.dtype in kernels.COMBINE_DTYPES
                and (rows is None or rows.dtype == resid.dtype)
                and all(e.dtype == resid.dtype and e.shape == resid.shape for e in extra)):
            if rows is None or token is None:
                rows, token = resid[:0], _NO_ROWS
            return kernels.combine(resid, rows, token, extra)
        out = torch.zeros_like(resid)
        if rows is not None and token is not None:
            out.index_add_(0, token, rows)
        for e in extra:
            out += e
        return resid + out

    def _lm_head(self, items: list[tuple[_UnitState, tuple[int, ...] | None, torch.Tensor]]
                 ) -> list[Logits]:
        """Final norm and vocabulary projection once over every item's picked rows."""
        assert self.dense is not None
        picked, shapes = [], []
        for st, micro, hidden in items:
            picks: list[int] = []
            rows_per_seq: list[int] = []
            # the unit's sequences homed here (a replayed plan's node may have been compiled
            # for another unit on the same homes), or the micro-batch of them the node is for
            seqs = st.seqs if micro is None else micro
            at = 0
            for i in seqs:
                row0, n = st.rows[i]
                if micro is not None:
                    row0, at = at, at + n
                keep = st.unit.seqs[i].num_logit_rows
                picks.extend(range(row0 + n - keep, row0 + n))
                rows_per_seq.append(keep)
            picked.append(hidden.index_select(0, self._on_device(index_tensor(picks)))
                          if len(picks) != hidden.shape[0] else hidden)
            shapes.append((seqs, tuple(rows_per_seq)))
        x = rms_norm(_cat(picked), self.dense.final_norm, self.spec.rms_norm_eps)
        logits = self._linear(x, self.dense.lm_head).float()
        return [Logits(seqs, rows, values)
                for (seqs, rows), values in zip(shapes, _split(logits, picked))]


def _pinned(page: Page) -> Page:
    """A page copied into the pinned relay: page-locked host memory where CUDA can use it
    (its copy to the GPU then runs asynchronously at the link's speed), else a plain copy
    (a CPU-only machine has no pinned memory; the copy stands in for it)."""
    pin = torch.cuda.is_available()

    def copy(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.pin_memory() if pin and t.device.type == "cpu" else t.clone()

    return replace(page, gate_up=copy(page.gate_up), down=copy(page.down),
                   gate_up_bias=copy(page.gate_up_bias), down_bias=copy(page.down_bias))


def _expert_from_pages(expert: int, layer: int, held: list[tuple[Page, int]], width: int
                       ) -> tuple[torch.Tensor, ...]:
    """One expert's weights (gate_up, down[, biases]) from the pages holding it: one whole
    (views of it), or slices that tile its intermediate width, joined in column order (a
    copy, before stacking the group copies them again)."""
    if len(held) == 1 and held[0][0].columns is None:
        page, j = held[0]
        return tuple(t[j] for t in page.tensors())
    held = sorted(held, key=lambda pj: (pj[0].columns or (0, 0))[0])
    at = 0
    for page, _ in held:
        if page.columns is None or page.columns[0] != at:
            raise RuntimeError(f"the pages of expert {expert} of layer {layer} hold columns "
                               f"{[p.columns for p, _ in held]}: they do not tile its width")
        at = page.columns[1]
    if at != width:
        raise RuntimeError(f"the pages of expert {expert} of layer {layer} hold columns "
                           f"{[p.columns for p, _ in held]} of its {width}")
    gates = [p.gate_up[j, :p.down.shape[2]] for p, j in held]
    ups = [p.gate_up[j, p.down.shape[2]:] for p, j in held]
    out = [torch.cat(gates + ups), torch.cat([p.down[j] for p, j in held], 1)]
    if held[0][0].gate_up_bias is not None:
        out.append(torch.cat([p.gate_up_bias[j, :p.down.shape[2]] for p, j in held]  # type: ignore[index]
                             + [p.gate_up_bias[j, p.down.shape[2]:] for p, j in held]))  # type: ignore[index]
        out.append(held[0][0].down_bias[held[0][1]])  # type: ignore[index]
    return tuple(out)


def _rows_of(inputs: Inputs) -> int:
    """Tokens a gate, combine or dispatch works on, read from its input (a replayed plan's
    node may have been compiled for another unit)."""
    if "attn" in inputs:
        return int(inputs["attn"][0][1].resid.shape[0])
    if "routing" in inputs:
        return int(inputs["routing"][0][1].xn.shape[0])
    return 0


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _split(t: torch.Tensor, like: list[Any]) -> list[torch.Tensor]:
    """t split by rows into pieces as long as each of `like` (row counts, or tensors)."""
    if len(like) == 1:
        return [t]
    return list(t.split([n if isinstance(n, int) else n.shape[0] for n in like]))


def _row_slices(parts: list[torch.Tensor]) -> list[slice]:
    """The rows of each of `parts` in their concatenation."""
    ends = list(accumulate(p.shape[0] for p in parts))
    return [slice(end - p.shape[0], end) for p, end in zip(parts, ends)]



def torch_device_of(name: str) -> torch.device:
    """'cpu:N' (virtual CPU devices share the CPU) -> cpu; 'cuda:N' -> that GPU."""
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name} needs CUDA, which this machine lacks")
        return torch.device("cuda", int(index or 0))
    return torch.device("cpu")
