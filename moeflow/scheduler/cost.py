"""The roofline cost model: how long each graph node takes on a given device.

For every node, FLOPs and bytes moved come from the ModelSpec's shapes and the node's token
counts (for routed experts and their transfers: the gate's per-expert row counts):

    duration = kernels * launch_overhead
             + max(flops / (peak_flops * efficiency(rows)), bytes / mem_bandwidth)
    transfer = latency + bytes / link_bandwidth

`efficiency(m) = m / (m + gemm_half_rows)` models how a GEMM with m rows per weight falls
short of peak. Memory-bound decode is dominated by bytes; prefill by FLOPs.

Pure: plain arithmetic on ModelSpec and Hardware.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moeflow.dataflow.graph import (
    Attention, Combine, Embed, Expert, Gate, Graph, LMHead, Node, Placement, Transfer,
)
from moeflow.models.spec import DTYPE_BYTES, ModelSpec
from moeflow.scheduler.hardware import Hardware

# Kernels (GPU launches / CPU op dispatches) a node of each kind issues.
KERNELS = {Embed: 1, Attention: 12, Gate: 6, Expert: 5, Combine: 3, LMHead: 3, Transfer: 1}


@dataclass(frozen=True, slots=True)
class NodeCost:
    flops: float
    bytes: float
    rows: float  # rows sharing each weight in its GEMMs (for efficiency)
    kernels: int


class CostModel:
    def __init__(self, spec: ModelSpec, hardware: Hardware, dtype: str | None = None) -> None:
        self.spec = spec
        self.hw = hardware
        self.dtype = dtype or spec.dtype
        self.b = DTYPE_BYTES[self.dtype]
        self.peak = hardware.device.flops_for(self.dtype)

    # -- per node ------------------------------------------------------------------

    def cost(self, graph: Graph, node: Node, rows: Sequence[int] = ()) -> NodeCost:
        """FLOPs and bytes of `node`. `rows` are, for a routed Expert or a dispatch/combine
        Transfer, the rows it handles per expert of its group."""
        s, b, d = self.spec, self.b, self.spec.hidden_size
        kernels = KERNELS[type(node)]
        if isinstance(node, Embed):
            return NodeCost(0, node.num_tokens * d * b * 2, node.num_tokens, kernels)
        if isinstance(node, Attention):
            return self._attention(graph, node)
        if isinstance(node, Gate):
            e = s.moe.num_experts
            t = node.num_tokens
            return NodeCost(2 * t * d * e, (e * d + t * d) * b, t, kernels)
        if isinstance(node, Expert):
            if node.kind != "routed":
                params = s.dense_params() if node.kind == "dense" else s.shared_params()
                t = node.num_tokens
                return NodeCost(2 * t * params, params * b + 2 * t * d * b, t, kernels)
            total = sum(rows)
            active = sum(1 for r in rows if r)
            if total == 0:
                return NodeCost(0, 0, 0, 0)
            return NodeCost(2 * total * s.expert_params(),
                            active * s.expert_params() * b + 2 * total * d * b,
                            total / active, kernels)
        if isinstance(node, Transfer):
            return NodeCost(0, sum(rows) * d * b, 0, kernels if sum(rows) else 0)
        if isinstance(node, Combine):
            return NodeCost(0, 4 * node.num_tokens * d * b, node.num_tokens, kernels)
        if isinstance(node, LMHead):
            r = node.num_rows
            head = s.vocab_size * d
            return NodeCost(2 * r * head, head * b + r * s.vocab_size * 4, max(r, 1), kernels)
        raise TypeError(f"no cost for {node!r}")

    def _attention(self, graph: Graph, node: Attention) -> NodeCost:
        s, b = self.spec, self.b
        a = s.attention
        t = node.num_tokens
        proj = s.attention_params()
        pairs = 0  # (query, key) pairs attended
        context = 0
        for i in node.seqs:
            chunk = graph.unit.seqs[i]
            end = chunk.start + chunk.num_tokens
            pairs += chunk.num_tokens * chunk.start + chunk.num_tokens * (chunk.num_tokens + 1) // 2
            context += end
        head_flops = a.num_heads * (a.head_dim + (a.v_head_dim if a.kind == "mla" else a.head_dim))
        flops = 2 * t * proj + 2 * pairs * head_flops
        kv_bytes = context * a.cache_width * b  # read the cache (incl. the new tokens)
        if a.kind == "mla":  # latent expanded per key: kv_b applied to the cached latents
            flops += 2 * context * a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
        return NodeCost(flops, proj * b + kv_bytes + 4 * t * s.hidden_size * b, t,
                        KERNELS[Attention])

    def duration(self, graph: Graph, node: Node, rows: Sequence[int] = ()) -> float:
        c = self.cost(graph, node, rows)
        if isinstance(node, Transfer):
            link = self.hw.link if node.src != node.dst else None
            return 0.0 if link is None else link.time(c.bytes)
        if c.kernels == 0:
            return 0.0
        dev = self.hw.device
        efficiency = c.rows / (c.rows + dev.gemm_half_rows) if c.rows else 1.0
        compute = c.flops / (self.peak * max(efficiency, 1e-9))
        memory = c.bytes / dev.mem_bandwidth
        return c.kernels * dev.launch_overhead + max(compute, memory)

    # -- memory --------------------------------------------------------------------

    def weight_bytes(self, placement: Placement, homes: Sequence[str]) -> dict[str, float]:
        """Weights each device holds: dense weights where requests are served, plus the
        routed experts it owns."""
        s = self.spec
        dense = s.total_params() - len(s.moe_layers) * s.moe.num_experts * s.expert_params()
        out = {dev: 0.0 for dev in placement.devices}
        for dev in homes:
            out[dev] = out.get(dev, 0.0) + dense * self.b
        per_expert = len(s.moe_layers) * s.expert_params() * self.b
        for owner in placement.expert_owners:
            out[placement.devices[owner]] += per_expert
        return out

    def kv_bytes_per_token(self) -> float:
        return self.spec.num_layers * self.spec.attention.cache_width * self.b

    def decode_step_floor(self) -> float:
        """Batch-1 decode time if every active weight streams once at full bandwidth."""
        return self.spec.active_params_per_token() * self.b / self.hw.device.mem_bandwidth
