"""DeviceWorker: one device's share of a model, and the ops that run each node kind on it.

A worker holds the dense weights (if it serves requests), the routed experts it owns, and
the KV cache of the sequences homed on it. `run(key, node, inputs)` executes one graph node
with real ops; `key` names the unit in flight (several may be in flight at once), whose
per-unit state `begin` prepared.

Values flowing along data edges:
    Embed, Combine          hidden [T, D]
    Attention               AttnOut(resid [T, D], xn [T, D])
    Gate                    Routing (rows sorted by dispatch order, their tokens and weights)
    Transfer(dispatch)      Rows for one expert group from one home
    Expert(routed)          ExpertOut: weighted output rows per home
    Transfer(combine)       Partial rows for one home
    Expert(shared / dense)  [T, D]
    LMHead                  Logits [R, V] (fp32)

Shapes: T tokens homed here, D hidden, A top-k, N = T*A routed rows, H/K query/kv heads,
d head dim, V vocab, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moeflow.actors.kvcache import PagedKVCache
from moeflow.actors.messages import MessageError, Payload
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
)
from moeflow.models.spec import ModelSpec
from moeflow.models.weights import DenseWeights, ExpertStack, to_device
from moeflow.ops.attention import decode_attention, decode_mask, prefill_attention
from moeflow.ops.backend import rows_per_weight
from moeflow.ops.experts import grouped_swiglu, swiglu
from moeflow.ops.norm import rms_norm
from moeflow.ops.rope import RopeTable, apply_half_rotation, apply_rope, half_rotation_tables
from moeflow.ops.router import route, router_logits

MLA_NORM_EPS = 1e-6  # DeepSeek's latent norms use their class default, not rms_norm_eps


@dataclass
class AttnOut:
    resid: torch.Tensor  # [T, D] residual stream after attention
    xn: torch.Tensor  # [T, D] its post-attention norm: the FFN input


@dataclass
class Routing:
    xn: torch.Tensor  # [T, D]
    token_of_row: torch.Tensor  # [N] token of each routed row, rows in dispatch order
    weight_of_row: torch.Tensor  # [N] fp32
    offsets: list[int]  # [E+1] first row of each dispatch rank
    ends: torch.Tensor  # [E] int32: offsets[1:], for grouped matmul
    counts: tuple[int, ...]  # rows per expert id


@dataclass
class Rows:
    """Routed rows of one home for one contiguous expert group."""

    home: str
    start: int  # first row within the home's dispatch order
    x: torch.Tensor  # [n, D]
    ends: torch.Tensor  # [G] int32 cumulative row ends per expert of the group
    weights: torch.Tensor  # [n] fp32


@dataclass
class Partial:
    start: int
    y: torch.Tensor  # [n, D] weighted expert outputs


@dataclass
class ExpertOut:
    parts: dict[str, Partial]


@dataclass
class Logits:
    seqs: tuple[int, ...]  # unit sequence indices
    rows_per_seq: tuple[int, ...]
    values: torch.Tensor  # [R, V] fp32


@dataclass
class _UnitState:
    unit: Unit
    rows: dict[int, tuple[int, int]]  # seq index -> (first row, num rows) among rows homed here
    token_ids: torch.Tensor  # [T]
    cos: torch.Tensor  # [T, R/2] fp32
    sin: torch.Tensor
    half_cos: torch.Tensor | None  # [T, 1, R] in the model dtype, for half rotation
    half_sin: torch.Tensor | None
    slots: torch.Tensor  # [T] cache slots of the new tokens
    decode_seqs: list[int] = field(default_factory=list)  # seq indices with 1 new token
    decode_rows: torch.Tensor | None = None
    decode_index: torch.Tensor | None = None  # [B * Lmax] cache slots
    decode_shape: tuple[int, int] = (0, 0)  # (B, Lmax)
    decode_masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)
    all_decode: bool = False
    prefill: list[tuple[int, int, int, int]] = field(default_factory=list)  # row0, n, start, seq


class DeviceWorker:
    def __init__(self, device: str, spec: ModelSpec, dtype: torch.dtype,
                 dense: DenseWeights | None, experts: dict[int, ExpertStack],
                 kv_tokens: int = 65536) -> None:
        self.device = device
        self.tdevice = torch_device_of(device)
        self.spec = spec
        self.dtype = dtype
        self.dense = dense
        self.experts = experts
        if self.tdevice.type != "cpu":
            if dense is not None:
                to_device(dense, self.tdevice)
            for stack in experts.values():
                to_device(stack, self.tdevice)
        self.rope = RopeTable(spec.rope, min(spec.max_position_embeddings, 4096))
        self.kv = PagedKVCache(spec.num_layers, spec.attention.cache_width, dtype, kv_tokens,
                               device=self.tdevice)
        self._units: dict[Any, _UnitState] = {}
        self._ranks: dict[Placement, tuple[torch.Tensor, dict[int, int]]] = {}
        self._stack_pos: dict[int, dict[int, int]] = {
            layer: {e: j for j, e in enumerate(stack.experts)} for layer, stack in experts.items()}

    def _gemm_rows(self, rows: int) -> None:
        if self.tdevice.type == "cpu":
            rows_per_weight(rows)

    # -- units ---------------------------------------------------------------------

    def begin(self, key: Any, unit: Unit, token_ids: dict[int, list[int]]) -> None:
        """Prepare to run `unit` here: reserve KV for the sequences homed on this device
        and lay out their tokens. `token_ids` maps seq index -> its new token ids."""
        homed = unit.seqs_on(self.device)
        rows: dict[int, tuple[int, int]] = {}
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        reserved: list[int] = []
        try:
            for i in homed:
                chunk = unit.seqs[i]
                tokens = token_ids[i]
                if len(tokens) != chunk.num_tokens:
                    raise ValueError(f"sequence {chunk.seq_id}: {len(tokens)} token ids for "
                                     f"{chunk.num_tokens} new tokens")
                rows[i] = (len(ids), chunk.num_tokens)
                ids.extend(tokens)
                positions.append(torch.arange(chunk.start, chunk.start + chunk.num_tokens))
                slots.append(self.kv.reserve(chunk.seq_id, chunk.start, chunk.num_tokens))
                reserved.append(chunk.seq_id)
        except Exception:
            for seq_id in reserved:  # leave the cache as it was
                chunk = next(c for c in unit.seqs if c.seq_id == seq_id)
                self.kv.rollback(seq_id, chunk.start)
            raise
        pos = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
        dev = self.tdevice
        cos, sin = (t.to(dev) for t in self.rope.cos_sin(pos))
        half = (None, None) if self.spec.rope.interleaved else half_rotation_tables(
            cos, sin, self.dtype)
        state = _UnitState(unit, rows, torch.tensor(ids, dtype=torch.int64, device=dev), cos,
                           sin, *half, (torch.cat(slots) if slots else pos).to(dev))
        for i in homed:
            chunk = unit.seqs[i]
            if chunk.num_tokens == 1 and chunk.start > 0:
                state.decode_seqs.append(i)
            else:
                state.prefill.append((rows[i][0], chunk.num_tokens, chunk.start, chunk.seq_id))
        if state.decode_seqs:
            seq_ids = [unit.seqs[i].seq_id for i in state.decode_seqs]
            index, lengths = self.kv.gather_index(seq_ids)
            state.decode_index, state.decode_shape = index.flatten().to(dev), tuple(index.shape)
            state.decode_masks = {w: decode_mask(lengths.to(dev), w)
                                  for w in {layer.sliding_window for layer in self.spec.layers}}
            state.decode_rows = torch.tensor([rows[i][0] for i in state.decode_seqs], device=dev)
            state.all_decode = not state.prefill
        self._units[key] = state

    def end(self, key: Any) -> None:
        self._units.pop(key, None)

    def abort(self, key: Any) -> None:
        """Forget a unit that will not finish, rolling its sequences' KV back."""
        state = self._units.pop(key, None)
        if state is None:
            return
        for i in state.rows:
            chunk = state.unit.seqs[i]
            self.kv.rollback(chunk.seq_id, chunk.start)

    def release(self, seq_id: int) -> None:
        """Free a finished sequence's KV cache."""
        self.kv.free(seq_id)

    # -- nodes ---------------------------------------------------------------------

    def run(self, key: Any, graph: Graph, node: Node, inputs: list[tuple[Node, Any]]) -> Any:
        return self.run_group([(key, graph, node, inputs)])[0]

    def run_group(self, items: list[tuple[Any, Graph, Node, list[tuple[Node, Any]]]]
                  ) -> list[Any]:
        """Run nodes coalesced into one kernel (same kind and layer, same weights, from
        different units): each GEMM reads its weights once for all of them. A single item
        is the plain case. Returns each item's value."""
        node = items[0][2]
        if isinstance(node, Expert):
            if node.kind == "routed":
                return self._routed([(g, n, inputs) for _, g, n, inputs in items])
            return self._dense_mlp(node, [inputs[0][1].xn for _, _, _, inputs in items])
        if isinstance(node, Attention):
            return self._attention([(self._units[k], n, inputs[0][1])
                                    for k, _, n, inputs in items])
        if isinstance(node, Gate):
            return self._gate(items[0][1], node, [inputs[0][1] for _, _, _, inputs in items])
        if isinstance(node, LMHead):
            return self._lm_head([(self._units[k], n, inputs[0][1]) for k, _, n, inputs in items])
        return [self._single(k, g, n, inputs) for k, g, n, inputs in items]

    def _single(self, key: Any, graph: Graph, node: Node, inputs: list[tuple[Node, Any]]) -> Any:
        if isinstance(node, Transfer):
            return self._transfer(graph, node, inputs)
        if isinstance(node, Combine):
            return self._combine(node, inputs)
        if isinstance(node, Embed):
            assert self.dense is not None
            return F.embedding(self._units[key].token_ids, self.dense.embed)
        raise TypeError(f"cannot run node {node!r}")

    def _attention(self, items: list[tuple[_UnitState, Attention, torch.Tensor]]
                   ) -> list[AttnOut]:
        """Projections once over every item's rows; attention itself per item, over its own
        sequences and KV cache."""
        assert self.dense is not None
        spec, a = self.spec, self.spec.attention
        layer = items[0][1].layer
        w = self.dense.layers[layer].attn
        hidden = _cat([h for _, _, h in items])  # [T, D]
        self._gemm_rows(hidden.shape[0])
        x = rms_norm(hidden, w.input_norm, spec.rms_norm_eps)
        if a.kind == "mla":
            q, kv_a = self._mla_project(layer, x)
        else:
            qkv = F.linear(x, w.qkv, w.qkv_bias)  # [T, (H + 2K) d]
        outs, row = [], 0
        for st, _, h in items:
            rows = slice(row, row + h.shape[0])
            row += h.shape[0]
            outs.append(self._mla_core(st, layer, q[rows], kv_a[rows]) if a.kind == "mla"
                        else self._gqa_core(st, layer, qkv[rows]))
        resid = hidden + F.linear(_cat(outs), w.o, w.o_bias)
        xn = rms_norm(resid, w.post_norm, spec.rms_norm_eps)
        return [AttnOut(r, n) for r, n in zip(_split(resid, items), _split(xn, items))]

    def _gqa_core(self, st: _UnitState, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [T, (H + 2K) d] of one unit -> attention output [T, H*d]"""
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
            qk = qkv[:, : a.q_width + a.kv_width].view(num_tokens, heads + kv_heads, d)
            v = qkv[:, a.q_width + a.kv_width:].view(num_tokens, kv_heads, d)
            if a.qk_norm == "head":
                qk = rms_norm(qk, w.qk_norm_heads, eps)  # type: ignore[arg-type]
        if st.half_cos is not None:
            qk = apply_half_rotation(qk, st.half_cos, st.half_sin)  # type: ignore[arg-type]
        else:
            qk = apply_rope(qk, st.cos, st.sin, interleaved=True)
        q, k = qk[:, :heads], qk[:, heads:]
        self.kv.write(layer, st.slots, torch.cat((k.flatten(1), v.flatten(1)), dim=1))

        def split_kv(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (kv[..., : a.kv_width].unflatten(-1, (kv_heads, d)),
                    kv[..., a.kv_width:].unflatten(-1, (kv_heads, d)))

        return self._attend(st, layer, q, (k, v), split_kv, a.softmax_scale).flatten(1)

    def _mla_project(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> q [T, H*(nope+rope)], kv_a [T, kv_lora + rope]"""
        w = self.dense.layers[layer].attn  # type: ignore[union-attr]
        if w.q is not None:
            q = F.linear(x, w.q)
        else:
            q = F.linear(rms_norm(F.linear(x, w.q_a), w.q_a_norm, MLA_NORM_EPS), w.q_b)  # type: ignore[arg-type]
        return q, F.linear(x, w.kv_a)

    def _mla_core(self, st: _UnitState, layer: int, q: torch.Tensor,
                  kv_a: torch.Tensor) -> torch.Tensor:
        """One unit's MLA (DeepSeek multi-head latent attention) -> output [T, H*v]"""
        a = self.spec.attention
        w = self.dense.layers[layer].attn  # type: ignore[union-attr]
        q = q.view(q.shape[0], a.num_heads, a.head_dim)
        q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        latent, k_pe = kv_a.split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        latent = rms_norm(latent, w.kv_a_norm, MLA_NORM_EPS)  # type: ignore[arg-type]
        q_pe = apply_rope(q_pe, st.cos, st.sin, True)
        k_pe = apply_rope(k_pe[:, None, :], st.cos, st.sin, True)[:, 0, :]
        query = torch.cat((q_nope, q_pe), dim=-1)  # [T, H, nope + rope]
        cached = torch.cat((latent, k_pe), dim=-1)  # [T, kv_lora + rope]
        self.kv.write(layer, st.slots, cached)

        def expand(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # c [..., L, kv_lora + rope] -> K [..., L, H, nope + rope], V [..., L, H, v]
            lat, pe = c.split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
            kv = F.linear(lat, w.kv_b).unflatten(-1, (a.num_heads, -1))
            k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
            pe = pe.unsqueeze(-2).expand(*k_nope.shape[:-1], a.qk_rope_head_dim)
            return torch.cat((k_nope, pe), dim=-1), v

        fresh = expand(cached)
        return self._attend(st, layer, query, fresh, expand, a.softmax_scale).flatten(1)

    def _attend(self, st: _UnitState, layer: int, q: torch.Tensor,
                fresh: tuple[torch.Tensor, torch.Tensor], unpack: Any,
                scale: float) -> torch.Tensor:
        """q [T, H, d] against each sequence's cached keys; `fresh` are this unit's own
        keys/values [T, K, *] (used directly by sequences that start at position 0)."""
        window = self.spec.layers[layer].sliding_window
        if st.decode_seqs:
            batch, length = st.decode_shape
            cached = self.kv.read(layer, st.decode_index).view(batch, length, -1)
            k, v = unpack(cached)
            mask = st.decode_masks[window]
            if st.all_decode:
                return decode_attention(q, k, v, mask, scale)
            out = q.new_empty(q.shape[0], q.shape[1], fresh[1].shape[-1])
            out[st.decode_rows] = decode_attention(q[st.decode_rows], k, v, mask, scale)
        else:
            out = q.new_empty(q.shape[0], q.shape[1], fresh[1].shape[-1])
        for row0, n, start, seq_id in st.prefill:
            if start == 0:
                k, v = fresh[0][row0:row0 + n], fresh[1][row0:row0 + n]
            else:
                k, v = unpack(self.kv.read(layer, self.kv.slots(seq_id, 0, start + n)))
            out[row0:row0 + n] = prefill_attention(q[row0:row0 + n], k, v, start, scale,
                                                   window)
        return out

    def _ranks_of(self, placement: Placement) -> tuple[torch.Tensor, dict[int, int]]:
        cached = self._ranks.get(placement)
        if cached is None:
            order = placement.dispatch_order()
            rank = {e: r for r, e in enumerate(order)}
            cached = (torch.tensor([rank[e] for e in range(len(order))], dtype=torch.int64,
                                   device=self.tdevice), rank)
            self._ranks[placement] = cached
        return cached

    def _gate(self, graph: Graph, node: Gate, attns: list[AttnOut]) -> list[Routing]:
        """Router logits once over every item's rows; routing per item."""
        assert self.dense is not None
        moe = self.spec.moe
        xns = [a.xn for a in attns]
        logits = router_logits(_cat(xns), self.dense.layers[node.layer].router, moe)  # type: ignore[arg-type]
        rank, _ = self._ranks_of(graph.placement)
        out = []
        for xn, part in zip(xns, _split(logits, xns)):
            ids, weights = route(part, moe)  # [T, A]
            row_rank = rank[ids.flatten()]  # [N]
            order = torch.argsort(row_rank, stable=True)
            per_rank = torch.bincount(row_rank, minlength=moe.num_experts)
            ends = torch.cumsum(per_rank, 0, dtype=torch.int32)
            counts = tuple(per_rank[rank].tolist())
            out.append(Routing(xn, order // moe.top_k, weights.flatten()[order],
                               [0, *ends.tolist()], ends, counts))
        return out

    def _rows(self, graph: Graph, routing: Routing, home: str, group: tuple[int, ...]) -> Rows:
        _, rank = self._ranks_of(graph.placement)
        r0, r1 = rank[group[0]], rank[group[-1]] + 1
        start, end = routing.offsets[r0], routing.offsets[r1]
        ends = routing.ends[r0:r1] - start if start else routing.ends[r0:r1]
        return Rows(home, start, routing.xn[routing.token_of_row[start:end]], ends,
                    routing.weight_of_row[start:end])

    def _transfer(self, graph: Graph, node: Transfer, inputs: list[tuple[Node, Any]]) -> Any:
        value = inputs[0][1]
        if node.payload == "dispatch":
            return self._rows(graph, value, node.src, node.experts)
        if node.payload == "combine":
            return value.parts[node.dst]
        return value

    def _routed(self, items: list[tuple[Graph, Expert, list[tuple[Node, Any]]]]
                ) -> list[ExpertOut]:
        """One grouped GEMM over the rows every item (unit) sends to these experts, from
        every home; each item gets back its own rows."""
        node = items[0][1]
        owners: list[int] = []  # the item of each batch
        batches: list[Rows] = []
        for i, (graph, n, inputs) in enumerate(items):
            for src, value in inputs:
                batches.append(value if isinstance(value, Rows)
                               else self._rows(graph, value, src.device, n.experts))
                owners.append(i)
        total = sum(b.x.shape[0] for b in batches)
        outs: list[ExpertOut] = [ExpertOut({}) for _ in items]
        if total == 0:  # no token chose these experts: a no-op
            for i, b in zip(owners, batches):
                outs[i].parts[b.home] = Partial(b.start, b.x)
            return outs
        stack = self.experts[node.layer]
        first = self._stack_pos[node.layer][node.experts[0]]
        gate_up = stack.gate_up[first:first + len(node.experts)]
        down = stack.down[first:first + len(node.experts)]
        perm = None
        if len(batches) == 1:
            x, ends, weights = batches[0].x, batches[0].ends, batches[0].weights
        else:  # merge the batches so that each expert's rows are contiguous
            x = torch.cat([b.x for b in batches])
            counts = [torch.diff(b.ends, prepend=b.ends.new_zeros(1)) for b in batches]
            expert_of_row = torch.cat([
                torch.repeat_interleave(torch.arange(len(c), device=c.device), c) for c in counts])
            perm = torch.argsort(expert_of_row, stable=True)
            x = x[perm]
            weights = torch.cat([b.weights for b in batches])[perm]
            ends = torch.stack(counts).sum(0).cumsum(0, dtype=torch.int32)
        if self.tdevice.type == "cpu":  # rows per active expert decide the GEMM backend
            if total > 2:
                active = int(torch.count_nonzero(torch.diff(ends, prepend=ends.new_zeros(1))))
                rows_per_weight(-(-total // active))
            else:
                rows_per_weight(total)
        y = grouped_swiglu(x, ends, gate_up, down)  # [n, D]
        y.mul_(weights.to(y.dtype)[:, None])  # routing weights applied in the model dtype
        if perm is not None:
            unsorted = torch.empty_like(y)
            unsorted[perm] = y
            y = unsorted
        row = 0
        for i, b in zip(owners, batches):
            n = b.x.shape[0]
            outs[i].parts[b.home] = Partial(b.start, y[row:row + n])
            row += n
        return outs

    def _dense_mlp(self, node: Expert, xns: list[torch.Tensor]) -> list[torch.Tensor]:
        """A dense MLP or shared expert, once over every item's rows."""
        assert self.dense is not None
        lw = self.dense.layers[node.layer]
        xn = _cat(xns)
        self._gemm_rows(xn.shape[0])
        if node.kind == "dense":
            out = swiglu(xn, lw.dense_gate_up, lw.dense_down)  # type: ignore[arg-type]
        else:
            out = swiglu(xn, lw.shared_gate_up, lw.shared_down)  # type: ignore[arg-type]
            if lw.shared_gate is not None:
                out = torch.sigmoid(F.linear(xn, lw.shared_gate)) * out
        return _split(out, xns)

    def _combine(self, node: Combine, inputs: list[tuple[Node, Any]]) -> torch.Tensor:
        attn: AttnOut = inputs[0][1]
        routing: Routing | None = None
        partials: list[Partial] = []
        extra: list[torch.Tensor] = []
        for src, value in inputs[1:]:
            if isinstance(src, Gate):
                routing = value
            elif isinstance(value, ExpertOut):
                partials.append(value.parts[node.device])
            elif isinstance(value, Partial):
                partials.append(value)
            else:  # shared expert or dense MLP output
                extra.append(value)
        # accumulate in the model dtype, as the families' own implementations do
        out = torch.zeros_like(attn.resid)
        if routing is not None and partials:
            partials.sort(key=lambda p: p.start)
            rows = partials[0].y if len(partials) == 1 else torch.cat([p.y for p in partials])
            out.index_add_(0, routing.token_of_row, rows)  # rows in dispatch order
        for e in extra:
            out += e
        return attn.resid + out

    def _lm_head(self, items: list[tuple[_UnitState, LMHead, torch.Tensor]]) -> list[Logits]:
        """Final norm and vocabulary projection once over every item's picked rows."""
        assert self.dense is not None
        picked, shapes = [], []
        for st, node, hidden in items:
            picks: list[int] = []
            rows_per_seq: list[int] = []
            for i in node.seqs:
                row0, n = st.rows[i]
                keep = st.unit.seqs[i].num_logit_rows
                picks.extend(range(row0 + n - keep, row0 + n))
                rows_per_seq.append(keep)
            picked.append(hidden[torch.tensor(picks, dtype=torch.int64, device=hidden.device)]
                          if len(picks) != hidden.shape[0] else hidden)
            shapes.append((node.seqs, tuple(rows_per_seq)))
        x = rms_norm(_cat(picked), self.dense.final_norm, self.spec.rms_norm_eps)
        self._gemm_rows(x.shape[0])
        logits = F.linear(x, self.dense.lm_head).float()
        return [Logits(seqs, rows, values)
                for (seqs, rows), values in zip(shapes, _split(logits, picked))]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _split(t: torch.Tensor, like: list[Any]) -> list[torch.Tensor]:
    """t split by rows into pieces as long as each of `like` (tensors, or items whose last
    element is a tensor)."""
    sizes = [(x[-1] if isinstance(x, tuple) else x).shape[0] for x in like]
    return list(t.split(sizes)) if len(sizes) > 1 else [t]


def torch_device_of(name: str) -> torch.device:
    """'cpu:N' (virtual CPU devices share the CPU) -> cpu; 'cuda:N' -> that GPU."""
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name} needs CUDA, which this machine lacks")
        return torch.device("cuda", int(index or 0))
    return torch.device("cpu")


def payload_to(value: Any, device: torch.device) -> Any:
    """A received Transfer value, moved to this worker's device if it is elsewhere."""
    if isinstance(value, Rows):
        if value.x.device == device:
            return value
        return Rows(value.home, value.start, value.x.to(device, non_blocking=True),
                    value.ends.to(device, non_blocking=True),
                    value.weights.to(device, non_blocking=True))
    if isinstance(value, Partial):
        return value if value.y.device == device else Partial(value.start, value.y.to(device))
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return value


def to_payload(value: Any) -> Payload:
    """A Transfer's value as a message payload (no copy)."""
    if isinstance(value, Rows):
        return Payload("rows", {"home": value.home, "start": value.start},
                       (value.x, value.ends, value.weights))
    if isinstance(value, Partial):
        return Payload("partial", {"start": value.start}, (value.y,))
    if isinstance(value, torch.Tensor):
        return Payload("tensor", {}, (value,))
    raise TypeError(f"cannot send a {type(value).__name__}")


def from_payload(payload: Payload) -> Any:
    """The value a Transfer carried, checked."""
    t, meta = payload.tensors, payload.meta
    try:
        if payload.kind == "rows" and len(t) == 3:
            x, ends, weights = t
            if (x.dim() != 2 or ends.dtype != torch.int32 or weights.shape != (x.shape[0],)
                    or (len(ends) and int(ends[-1]) != x.shape[0])):
                raise MessageError(f"inconsistent rows: x {list(x.shape)}, ends "
                                   f"{list(ends.shape)}, weights {list(weights.shape)}")
            return Rows(str(meta["home"]), int(meta["start"]), x, ends, weights)
        if payload.kind == "partial" and len(t) == 1 and t[0].dim() == 2:
            return Partial(int(meta["start"]), t[0])
        if payload.kind == "tensor" and len(t) == 1:
            return t[0]
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"bad {payload.kind} payload: {exc}") from None
    raise MessageError(f"bad {payload.kind} payload with {len(t)} tensors")
