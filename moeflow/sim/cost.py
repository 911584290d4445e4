"""The roofline cost model: how long each graph node takes on a given device.

For every node, FLOPs and bytes moved come from the ModelSpec's shapes and the node's token
counts (for routed experts and their transfers: the gate's per-expert row counts):

    duration = kernels * launch_overhead
             + max(flops / (peak_flops * efficiency(rows)) + attention_flops / attention_peak,
                   bytes / mem_bandwidth)
             + activation_bytes / activation_bandwidth
    transfer = latency + bytes / link_bandwidth

The max is the roofline of the node's matmuls (weights stream while tensor units work);
elementwise passes over activations (gathers, SwiGLU, scaling, the KV cache) are separate
kernels, so they add. `efficiency(m) = m / (m + gemm_half_rows)` models how a GEMM with m
rows per weight falls short of peak, except up to `gemv_rows`, where a GEMV kernel is bound
by bandwidth alone. Memory-bound decode is dominated by weight bytes; prefill by FLOPs.

dtype: `bfloat16`/`float16`/`float32` use that type throughout. `fp8` (or `float8`) is
W8A16-style serving: weights are stored and streamed in one byte and their GEMMs run at the
device's fp8 FLOP/s; activations, their transfers, the KV cache and the attention kernel
stay in bfloat16. A device without fp8 FLOP/s refuses it.

The SM partition of EPS-MoE: when a plan pipelines its experts (a routed Expert node holds
fewer experts than its owner has: PN > 1) on a GPU, communication kernels run beside the
expert GEMM and take SMs from it. The paper (arXiv 2410.12247, H800) capped the GEMM at
116 of the 132 SMs and left 16 for communication, so such a GEMM gets `GEMM_SM_SHARE` =
116/132 of the device's FLOP/s. Not modelled: what the 16 SMs do to the transfers (they
stay link-bound), HBM contention between the two, other kernels (attention, shared
experts) that also run while communication does, wave quantization (the share is taken
as linear), and a memory-bound GEMM (the share scales FLOP/s, not bandwidth). GPUs other
than H800/H100/H200 take the same fraction. A plan with micro-batches whose experts are
spread over several GPUs (eps's two-batch overlap) runs its kernels beside communication,
so there every compute node, attention included, gets the share (a dense layer's, the
embedding and the LM head too, a slight overcharge: nothing crosses a link then).
Unpipelined plans (batch-ep) keep every SM, and so do a GPU's micro-batches beside its host
(cgopipe: its copies run on copy engines).

The kernel of a routed Expert, as the scheduler's `on_routing` chose it: "grouped" (the
default) is one launch over the group's experts; "dense" launches a GEMM per expert that has
rows. Not modelled: a grouped kernel's shortfall against dense GEMMs at large loads (EPS-MoE
measured DenseGemm the faster above ~4096 tokens on H800); it needs a table measured on the
GPU, so here dense costs its extra launches and nothing is gained by it.

Pure: plain arithmetic on ModelSpec and Hardware.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from moeflow.dataflow.graph import (
    Attention, Combine, Embed, Expert, Gate, Graph, LMHead, Node, Placement, Transfer, Unit,
)
from moeflow.dataflow.kinds import KINDS
from moeflow.dataflow.offload import page_columns
from moeflow.models.spec import DTYPE_BYTES, ModelSpec
from moeflow.sim.hardware import DeviceSpec, Hardware

# Kernels (GPU launches / CPU op dispatches) a node of each kind issues, as its kind declares
KERNELS = {cls: kind.launches for cls, kind in KINDS.items()}
# EPS-MoE (arXiv 2410.12247) on H800: the expert GEMM on 116 of 132 SMs while pipelining
GEMM_SMS, DEVICE_SMS = 116, 132
GEMM_SM_SHARE = GEMM_SMS / DEVICE_SMS
# what crosses a device's link to its host (PCIe): weight pages, activations to and from
# CPU attention
HOST_PAYLOADS = ("weights", "qkv", "hidden", "kv")
FP8 = ("fp8", "float8")  # accepted names; hardware presets key its FLOP/s "float8"


class DtypeError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class NodeCost:
    flops: float  # in matmuls against weights
    bytes: float  # weights (and, for transfers, the payload) moved
    rows: float  # rows sharing each weight in its GEMMs (for efficiency)
    kernels: int
    activation_bytes: float = 0.0  # elementwise traffic over activations and the KV cache
    attention_flops: float = 0.0  # in the attention kernel (scores and weighted values)
    sm_share: float = 1.0  # of the device's FLOP/s its GEMMs get (EPS's SM partition)


class CostModel:
    def __init__(self, spec: ModelSpec, hardware: Hardware, dtype: str | None = None) -> None:
        self.spec = spec
        self.hw = hardware
        self.dtype = dtype or spec.dtype
        dev = hardware.device
        if self.dtype in FP8:
            if "float8" not in dev.peak_flops:
                raise DtypeError(f"--dtype {self.dtype}: {dev.name} has no fp8 tensor cores "
                                 f"(fp8 runs on h100, h800, h200 and l4); use bfloat16")
            self.dtype = "float8"
            self.wb = 1  # bytes per weight
            self.b = DTYPE_BYTES["bfloat16"]  # bytes per activation element
            self.peak = dev.peak_flops["float8"]
            self.attention_peak = dev.attention_flops or dev.flops_for("bfloat16")
        elif self.dtype in DTYPE_BYTES:
            self.wb = self.b = DTYPE_BYTES[self.dtype]
            self.peak = dev.flops_for(self.dtype)
            self.attention_peak = dev.attention_flops or self.peak
        else:
            raise DtypeError(f"unknown dtype {self.dtype!r}; expected one of "
                             f"{', '.join([*sorted(DTYPE_BYTES), 'fp8'])}")
        self.sm_share = GEMM_SM_SHARE if dev.kind == "gpu" else 1.0
        # per device name: its roofline, GEMM and attention FLOP/s (the host's differ)
        self._roofs: dict[str, tuple[DeviceSpec, float, float]] = {}
        self._placement: Placement | None = None
        self._owned: dict[str, int] = {}  # device -> experts it owns under `_placement`
        self._exchanging: dict[Placement, bool] = {}  # bounded: the run's placements
        # each kind's cost method, as its declaration names it
        self._by_kind = {cls: getattr(self, kind.cost) for cls, kind in KINDS.items()}

    # -- per node ------------------------------------------------------------------

    def cost(self, graph: Graph, node: Node, rows: Sequence[int] = (),
             unit: Unit | None = None, kernel: str | None = None) -> NodeCost:
        """FLOPs and bytes of `node`. `rows` are, for a routed Expert or a dispatch/combine
        Transfer, the rows it handles per expert of its group. `unit` is the one the node's
        sizes are bound to when a plan is replayed for another unit than its graph's.
        `kernel`: a routed Expert's ("grouped", "dense" or None: grouped)."""
        c = self.bare_cost(graph, node, rows, unit, kernel)
        if (c.sm_share == 1.0 and self.sm_share < 1.0 and graph.micro_batched
                and not isinstance(node, Transfer) and self.exchanging(graph.placement)):
            # micro-batches overlap one's compute with another's all-to-all: every kernel
            # runs beside the communication kernels (the SM partition). A node's cost is
            # shared by its kind's nodes of every layer (moeflow.sim.replay), so a dense
            # layer's, the embedding's and the LM head's are charged it too (a slight
            # overcharge: nothing crosses a link then)
            return replace(c, sm_share=self.sm_share)
        return c

    def exchanging(self, placement: Placement) -> bool:
        """Whether experts are spread over several GPUs (their all-to-all runs on SMs;
        copies to and from a host run on copy engines)."""
        known = self._exchanging.get(placement)
        if known is None:
            gpus = {d for d in placement.owners() if self.hw.spec(d).kind == "gpu"}
            known = self._exchanging[placement] = len(gpus) > 1
        return known

    def bare_cost(self, graph: Graph | None, node: Node, rows: Sequence[int] = (),
                  unit: Unit | None = None, kernel: str | None = None) -> NodeCost:
        """`cost` on all of the device's SMs (`graph` may be None where `unit` is given and
        the node is no routed Expert): the method its kind names (moeflow.dataflow.kinds)."""
        method = self._by_kind.get(type(node))
        if method is None:
            raise TypeError(f"no cost for {node!r}")
        return method(graph, node, rows, unit, kernel)  # type: ignore[no-any-return]

    # each kind's work, as KINDS names it: (graph, node, rows, unit, kernel) -> NodeCost

    def _embed_cost(self, graph: Graph | None, node: Embed, rows: Sequence[int],
                    unit: Unit | None, kernel: str | None) -> NodeCost:
        return NodeCost(0, 0, node.num_tokens, KERNELS[Embed],
                        node.num_tokens * self.spec.hidden_size * self.b * 2)

    def _attention_cost(self, graph: Graph | None, node: Attention, rows: Sequence[int],
                        unit: Unit | None, kernel: str | None) -> NodeCost:
        assert graph is not None or unit is not None
        return self._attention(graph.unit if unit is None else unit, node)  # type: ignore

    def _gate_cost(self, graph: Graph | None, node: Gate, rows: Sequence[int],
                   unit: Unit | None, kernel: str | None) -> NodeCost:
        e, t, d = self.spec.moe.num_experts, node.num_tokens, self.spec.hidden_size
        return NodeCost(2 * t * d * e, e * d * self.wb, t, KERNELS[Gate],
                        t * (d * self.b + 3 * e * 4))

    def _expert_cost(self, graph: Graph | None, node: Expert, rows: Sequence[int],
                     unit: Unit | None, kernel: str | None) -> NodeCost:
        s, d = self.spec, self.spec.hidden_size
        if node.kind != "routed":
            params = s.dense_params() if node.kind == "dense" else s.shared_params()
            width = params // (3 * d) if d else 0
            t = node.num_tokens
            return NodeCost(2 * t * params, params * self.wb, t, KERNELS[Expert],
                            t * (2 * d + 6 * width) * self.b)
        assert graph is not None
        return self.routed_cost(sum(rows), sum(1 for r in rows if r),
                                self.pipelined(graph, node), kernel)

    def _transfer_cost(self, graph: Graph | None, node: Transfer, rows: Sequence[int],
                       unit: Unit | None, kernel: str | None) -> NodeCost:
        s, launches = self.spec, KERNELS[Transfer]
        if node.payload in ("weights", "pin"):  # a page of routed experts, or of slices of
            # them (to the GPU, or into the pinned relay on its owner)
            width = s.moe.intermediate_size
            start, end = page_columns(node.part, width)
            return NodeCost(0, len(node.experts) * s.expert_params() * self.wb * (end - start)
                            / width, 0, launches)
        if node.num_bytes is not None:  # sized when compiled (activations to the host)
            return NodeCost(0, node.num_bytes, 0, launches if node.num_bytes else 0)
        return NodeCost(0, sum(rows) * s.hidden_size * self.b, 0, launches if sum(rows) else 0)

    def _combine_cost(self, graph: Graph | None, node: Combine, rows: Sequence[int],
                      unit: Unit | None, kernel: str | None) -> NodeCost:
        t = node.num_tokens
        return NodeCost(0, 0, t, KERNELS[Combine],
                        (self.spec.moe.top_k + 3) * t * self.spec.hidden_size * self.b)

    def _lm_head_cost(self, graph: Graph | None, node: LMHead, rows: Sequence[int],
                      unit: Unit | None, kernel: str | None) -> NodeCost:
        r, d, b = node.num_rows, self.spec.hidden_size, self.b
        head = self.spec.vocab_size * d
        return NodeCost(2 * r * head, head * self.wb, max(r, 1), KERNELS[LMHead],
                        r * (2 * d * b + self.spec.vocab_size * 4))

    def routed_cost(self, total: float, active: int, pipelined: bool = False,
                    kernel: str | None = None) -> NodeCost:
        """A routed Expert node's cost: `total` rows over `active` experts hit, its GEMMs on
        `GEMM_SM_SHARE` of a GPU when its plan pipelines; the "dense" kernel launches its
        GEMMs once per expert hit."""
        if total == 0 or active == 0:
            return NodeCost(0, 0, 0, 0)
        s, d = self.spec, self.spec.hidden_size
        f = s.moe.intermediate_size
        # gather rows in, gate/up out and read back, SwiGLU, down out, scaled in place
        launches = KERNELS[Expert] * (active if kernel == "dense" else 1)
        return NodeCost(2 * total * s.expert_params(), active * s.expert_params() * self.wb,
                        total / active, launches, total * (4 * d + 6 * f) * self.b,
                        sm_share=self.sm_share if pipelined else 1.0)

    def pipelined(self, graph: Graph, node: Expert) -> bool:
        """Whether `node` is one of several expert groups of its owner (EPS's PN > 1)."""
        placement = graph.placement
        if placement is not self._placement:
            self._placement, self._owned = placement, {}
        owned = self._owned.get(node.device)
        if owned is None:
            owned = self._owned[node.device] = len(placement.experts_of(node.device))
        return len(node.experts) < owned

    def _attention(self, unit: Unit, node: Attention) -> NodeCost:
        s, b, d = self.spec, self.b, self.spec.hidden_size
        a = s.attention
        t = node.num_tokens
        proj = s.attention_params()
        pairs = 0  # (query, key) pairs attended
        context = 0
        for i in node.seqs:
            chunk = unit.seqs[i]
            pairs += chunk.num_tokens * chunk.start + chunk.num_tokens * (chunk.num_tokens + 1) // 2
            context += chunk.start + chunk.num_tokens
        head_flops = a.num_heads * (a.head_dim + (a.v_head_dim if a.kind == "mla" else a.head_dim))
        flops = 2 * t * proj
        attention = 2 * pairs * head_flops
        if a.kind == "mla":  # latents expanded per key: kv_b applied to the cached latents,
            # a GEMM over `context` rows even when t is one decode token, so it is charged
            # with the attention kernel's work (at its rate), not at the projections' rows
            attention += 2 * context * a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim
                                                                       + a.v_head_dim)
        kv_bytes = context * a.cache_width * b  # the cache read (incl. the new tokens)
        qkv_width = a.q_width + 2 * a.kv_width
        if node.part == "pre":  # input norm, QKV, q/k norms, rope
            weights = d * qkv_width + d
            return NodeCost(2 * t * weights, weights * self.wb, t, 5,
                            t * (4 * d + 3 * qkv_width) * b)
        if node.part == "store":  # a prefill's keys and values written into the cache
            return NodeCost(0, 0, t, 1, 2 * t * 2 * a.kv_width * b)
        if node.part == "core":  # cache write, attention over the cache
            return NodeCost(0, 0, t, 4, t * 2 * qkv_width * b + kv_bytes, attention)
        if node.part == "post":  # output projection, residual, post norm
            weights = a.o_width * d + d
            return NodeCost(2 * t * weights, weights * self.wb, t, 3,
                            t * (6 * d + a.o_width) * b)
        # norms, q/k/v, rope, cache write, output projection, residual, post norm (a
        # prefill part: its keys and values handed on for the cache instead)
        act = t * (10 * d + 2 * qkv_width) * b
        return NodeCost(flops, proj * self.wb, t, KERNELS[Attention], act + kv_bytes, attention)

    def group_cost(self, items: Sequence[tuple[Graph, Node, Sequence[int]]]) -> NodeCost:
        """The cost of nodes coalesced into one kernel: their work adds up, the weights they
        share are read once. Routed experts merge their rows expert by expert; transfers
        sent together add their bytes up."""
        first = items[0][1]
        if isinstance(first, Expert) and first.kind == "routed":
            return self.merge(items[0][0], first, [], [r for _, _, r in items])
        return self.merge(items[0][0], first, [self.cost(g, n, r) for g, n, r in items], [])

    def merge(self, graph: Graph, first: Node, costs: Sequence[NodeCost],
              rows: Sequence[Sequence[int]], kernel: str | None = None) -> NodeCost:
        """`group_cost` from its members' costs, or for routed experts from their rows (run
        on `kernel`)."""
        if isinstance(first, Expert) and first.kind == "routed":
            merged = [sum(r[j] for r in rows) for j in range(len(first.experts))]
            return self.cost(graph, first, merged, kernel=kernel)
        if isinstance(first, Transfer):  # payloads share nothing: they all cross the link
            return NodeCost(0.0, sum(c.bytes for c in costs), 0, len(costs))
        return NodeCost(sum(c.flops for c in costs), max(c.bytes for c in costs),
                        sum(c.rows for c in costs), max(c.kernels for c in costs),
                        sum(c.activation_bytes for c in costs),
                        sum(c.attention_flops for c in costs),
                        min(c.sm_share for c in costs))

    def duration(self, graph: Graph, node: Node, rows: Sequence[int] = (),
                 kernel: str | None = None) -> float:
        return self.time_of(node, self.cost(graph, node, rows, kernel=kernel))

    def group_duration(self, items: Sequence[tuple[Graph, Node, Sequence[int]]]) -> float:
        if len(items) == 1:
            return self.duration(*items[0])
        return self.time_of(items[0][1], self.group_cost(items))

    def time_of(self, node: Node, c: NodeCost) -> float:
        if isinstance(node, Transfer):
            if node.payload == "pin":  # a copy in its owner's memory: read, then written
                return 2 * c.bytes / self.hw.spec(node.src).mem_bandwidth
            if node.dsts == (node.src,):
                return 0.0
            if node.payload in HOST_PAYLOADS:
                return self.hw.host_link.time(c.bytes)
            # a message to each destination (a dispatch or combine may go to several)
            return self.hw.link.time(c.bytes, len(node.dsts))
        if c.kernels == 0:
            return 0.0
        roof = self._roofs.get(node.device)
        if roof is None:
            roof = self._roofs[node.device] = self.roof(node.device)
        dev, peak, attention_peak = roof
        if c.rows <= dev.gemv_rows:
            efficiency = 1.0
        else:
            efficiency = c.rows / (c.rows + dev.gemm_half_rows) if c.rows else 1.0
        compute = c.flops / (peak * c.sm_share * max(efficiency, 1e-9))
        if c.attention_flops:
            compute += c.attention_flops / (attention_peak * c.sm_share)
        memory = c.bytes / dev.mem_bandwidth
        elementwise = c.activation_bytes / (dev.activation_bandwidth or dev.mem_bandwidth)
        return c.kernels * dev.launch_overhead + max(compute, memory) + elementwise

    def roof(self, device: str) -> tuple[DeviceSpec, float, float]:
        """A device's roofline and its GEMM and attention FLOP/s in this model's dtype: the
        node's devices', or its host's (which runs fp8 weights at its bf16 rate)."""
        dev = self.hw.spec(device)
        if dev is self.hw.device:
            return dev, self.peak, self.attention_peak
        peak = dev.flops_for("bfloat16" if self.dtype == "float8" else self.dtype)
        return dev, peak, dev.attention_flops or peak

    # -- memory --------------------------------------------------------------------

    def weight_bytes(self, placement: Placement, homes: Sequence[str]) -> dict[str, float]:
        """Weights each device holds: dense weights where requests are served, plus the
        routed experts it owns."""
        s = self.spec
        dense = s.total_params() - len(s.moe_layers) * s.moe.num_experts * s.expert_params()
        out = {dev: 0.0 for dev in placement.devices}
        for dev in homes:
            out[dev] = out.get(dev, 0.0) + dense * self.wb
        per_expert = len(s.moe_layers) * s.expert_params() * self.wb
        for owner in placement.expert_owners:
            out[placement.devices[owner]] += per_expert
        return out

    def kv_bytes_per_token(self) -> float:
        return self.spec.num_layers * self.spec.attention.cache_width * self.b

    def decode_step_floor(self) -> float:
        """Batch-1 decode time if every active weight streams once at full bandwidth."""
        return self.spec.active_params_per_token() * self.wb / self.hw.device.mem_bandwidth


class RowCosts:
    """Durations of the nodes whose cost depends on a gate's draw, computed once per value
    of what they depend on: a routed Expert's by its rows and the experts they hit, a
    dispatch or combine Transfer's by its rows and whether it stays on its device."""

    def __init__(self, cost: CostModel, adjusted: bool = False) -> None:
        self.cost = cost
        # a scheduler's on_routing picks routed Experts' kernels: they are sized as they
        # start, once it has, not when their gates draw
        self.adjusted = adjusted
        self.row_bytes = cost.spec.hidden_size * cost.b  # of a row of the hidden state
        # (rows, hit, pipelined, kernel) -> s
        self._routed: dict[tuple[int, int, bool, str | None], float] = {}
        # transfers' seconds by (rows, destinations), [0] between devices and [1] within
        # one: read these first, `moved` fills them
        self.moved_seconds: tuple[dict[tuple[int, int], float], dict[tuple[int, int], float]] \
            = ({}, {})

    def routed(self, graph: Graph, node: Expert, rows: Sequence[int],
               kernel: str | None = None) -> float:
        key = (sum(rows), len(rows) - rows.count(0), self.cost.pipelined(graph, node), kernel)
        duration = self._routed.get(key)
        if duration is None:
            duration = self._routed[key] = self.cost.duration(graph, node, rows, kernel)
        return duration

    def moved(self, graph: Graph, node: Transfer, num_rows: int) -> float:
        cache = self.moved_seconds[node.dsts == (node.src,)]
        key = (num_rows, len(node.dsts))
        duration = cache.get(key)
        if duration is None:
            duration = cache[key] = self.cost.duration(graph, node, (num_rows,))
        return duration
