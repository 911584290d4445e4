"""cgopipe: MoE-Lightning's CGOPipe, for throughput on a GPU too small for the weights
(arXiv 2411.11217, ASPLOS '25); and flexgen, the FlexGen-style schedule it is measured
against.

The cluster's first device is the GPU, its last the host (on a CPU-only machine, two CPU
actors stand in for them). The placement says where the routed experts are stored: the
GPU's own are resident, every other owner's are paged in, layer by layer, as
`Transfer(weights)` nodes (`moeflow.dataflow.offload`). Every request is served by the GPU.
Under a GPU memory cap (`EngineConfig.gpu_memory`, `--gpu-memory`), `capped_placement`
keeps on the GPU as many experts as fit beside its dense weights and the double buffer.

cgopipe (`CGOPipe(micro_batches=None, micro_batch_size=None, pages=None,
micro_batch_tokens=None)`):
- Batching as batch-ep (one step at a time, every running request plus what the budgets
  admit, long prompts in chunks), all homed on the GPU.
- Each unit is cut into micro-batches by MoE-Lightning's Algorithm 2: sequences sorted by
  length, longest first, each put in the micro-batch with the fewest tokens so far, a
  micro-batch closed at `micro_batch_size` sequences. Without a size, `micro_batches`
  (default 3: the fewest that keep the pipeline full) of them.
- A unit of decodes alone, given `micro_batch_tokens` too (HRM's policy gives both: μ
  and μ·s, its μ prompts of the mean prompt length s, the prefill chunk its memory model
  sizes a micro-batch by), takes as many micro-batches as that budget of new tokens
  needs, and at least the 3 that keep the pipeline full (or `micro_batches`, HRM's
  n_ub, if fewer), Algorithm 2 filling them (`pack_by_tokens`). A decoding request has
  one new token, so those micro-batches hold up to s times μ requests: each micro-batch
  reads every expert on the GPU, and fewer of them leave the GPU under the link's time.
  In MoE-Lightning's S1 (simulated, `benchmarks/cgopipe.py`, generation 32 / 64 / 128 /
  256) the decode steps had been bound by the GPU (18 micro-batches of μ, 5.61 s a step
  against the link's 5.31 s at 128); with 3, cgopipe went from 332.2 / 420.6 / 395.1 /
  278.3 tok/s to 337.0 / 432.3 / 409.2 / 284.6. Packing units with prompts by tokens as
  well gained 1-3 % more there, but put a long prompt's chunk beside a decode, its
  attention then on the host (a stream of 2048-token prompts 1.6 % slower): left out.
- Per layer and micro-batch: PreAttn (norm, QKV, RoPE) on the GPU, q/k/v to the host,
  attention over the host's KV cache on the host, its output back, PostAttn (O-proj,
  residual, norm), router and experts on the GPU. A micro-batch of whole fresh prompts is
  prefilled on the GPU instead: all of its attention there, over the prompts' own keys,
  and only their keys and values go to the host's cache (d2h, then a store on the host),
  in the same slots of the issue order. MLA models (DeepSeek-V2/V3) keep attention whole
  on the GPU: its latent cache is not cut yet.
- The issue order is the paper's, one static order per stream (InOrder): on the GPU, for
  step k = (layer i, micro-batch j), the post-attention chain of k, then PreAttn of step
  k+2 (the CPU works two micro-batches ahead; a prologue issues steps 0 and 1); the host
  attends in step order; its h2d stream interleaves the hidden state of (i, j) with weight
  page j of layer i+1 (a layer's pages: `pages`, by default one per micro-batch; whole
  experts while they last, else slices of every expert: `moeflow.dataflow.offload`).
- Weight pages go into a double buffer of two layers by layer parity: a page of layer i
  waits (a write-after-read edge) for every expert of layer i-2.
- Each page passes through the host's pinned relay (`moeflow.dataflow.offload`): copied
  into one of two pinned slots on the owner's `pin` stream, in page order, a slot refilled
  once its last page has crossed to the GPU, so the copy of page j+2 runs while page j+1
  crosses and the GPU computes with page j.

flexgen (`FlexGen()`): the same batching, one micro-batch, attention whole on the GPU with
its KV cache there, and each layer's offloaded experts streamed as one page, the next
layer's while this one computes.

For the simulator, `reserved_weights` sets the GPU's double buffer and the host's pinned
relay aside and `kv_devices`
puts the KV cache on the host (`moeflow.sim.offload` lays out the node: one GPU and its
host). The real engine admits by the GPU's KV pool, the same size as the host's (every
actor gets the same `kv_cache_tokens`); if the host's actor restarts, the requests whose
KV it kept fail.

Only a micro-batch of fresh prompts alone is prefilled on the GPU: one that shares its
micro-batch with a request under way (continuous batching mixes them), or a prompt's later
chunk, attends on the host. Cutting fresh prompts into micro-batches apart from the rest
was measured and left out: in MoE-Lightning's S1 (simulated, `benchmarks/cgopipe.py`) it
cost 11-13 % of throughput at generation 32 (Algorithm 2 no longer balances the
micro-batches' tokens, and the GPU takes attention the host did in their shadow), and
on a stream of 2048-token prompts it gained under 1 % (the link bounds both).

The micro-batches come from HRM's policy search (`moeflow.sim.hrm_search.hrm_cgopipe`:
`micro_batch_size` μ, `micro_batch_tokens` μ·s and `micro_batches` n_ub) where the
machine is described: `moeflow simulate` on its hardware, the engine given
`EngineConfig.hardware` (`moeflow.serve.build.searched_cgopipe`); else 3 micro-batches.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from moeflow.dataflow.graph import Graph, GraphError, Placement, Unit
from moeflow.dataflow.offload import RELAY_SLOTS, OffloadCut, OffloadNodes, compile_offload
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.base import Budget, Cluster, RequestView, Scheduler, unit_shape
from moeflow.scheduler.batch_ep import BatchEP
from moeflow.scheduler.plan import InOrder, Plan, Stream

LOOKAHEAD = 2  # PreAttn of step k + 2 follows PostAttn of step k


def algorithm2(unit: Unit, num_micro_batches: int | None, micro_batch_size: int | None
               ) -> tuple[tuple[int, ...], ...]:
    """MoE-Lightning's Algorithm 2: the unit's sequences (indices) in micro-batches, longest
    first into the one with the fewest tokens; each micro-batch, and the micro-batches by
    their first sequence, in unit order."""
    n = len(unit.seqs)
    if micro_batch_size is not None:
        count = -(-n // micro_batch_size)
        cap = micro_batch_size
    else:
        count = min(n, num_micro_batches or 3)
        cap = -(-n // count)
    batches: list[list[int]] = [[] for _ in range(count)]
    tokens = [0] * count
    lengths = {i: s.start + s.num_tokens for i, s in enumerate(unit.seqs)}
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        j = min((j for j in range(count) if len(batches[j]) < cap),
                key=lambda j: (tokens[j], j))
        batches[j].append(i)
        tokens[j] += lengths[i]
    return tuple(sorted(tuple(sorted(b)) for b in batches if b))


def pack_by_tokens(unit: Unit, budget: int, most: int) -> tuple[tuple[int, ...], ...]:
    """Algorithm 2 with a budget of new tokens per micro-batch in place of a count of
    requests: as many micro-batches as the budget needs and, where the host attends (some
    sequence is under way), at least the LOOKAHEAD + 1 that keep the pipeline full (or
    `most`, if fewer); sequences longest first, each into the lightest micro-batch that
    still has room for its new tokens, a new micro-batch where none has (a sequence over
    the budget alone). Micro-batches, and their sequences, in unit order."""
    n = len(unit.seqs)
    new = [s.num_tokens for s in unit.seqs]
    least = min(LOOKAHEAD + 1, most) if any(s.start > 0 for s in unit.seqs) else 1
    count = max(1, min(n, max(least, -(-sum(new) // budget))))
    batches: list[list[int]] = [[] for _ in range(count)]
    tokens, room = [0] * count, [budget] * count
    lengths = [s.start + s.num_tokens for s in unit.seqs]
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        fits = [j for j in range(len(batches)) if room[j] >= new[i]]
        if not fits:
            batches.append([])
            tokens.append(0)
            room.append(budget)
            fits = [len(batches) - 1]
        j = min(fits, key=lambda j: (tokens[j], j))
        batches[j].append(i)
        tokens[j] += lengths[i]
        room[j] -= new[i]
    return tuple(sorted(tuple(sorted(b)) for b in batches if b))


class CGOPipe(Scheduler):
    name = "cgopipe"
    cpu_attention = True

    def __init__(self, micro_batches: int | None = None, micro_batch_size: int | None = None,
                 pages: int | None = None, micro_batch_tokens: int | None = None) -> None:
        for label, value in (("micro_batches", micro_batches),
                             ("micro_batch_size", micro_batch_size), ("pages", pages),
                             ("micro_batch_tokens", micro_batch_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        self.micro_batches = micro_batches
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.pages = pages

    # -- batching --------------------------------------------------------------------

    def form_units(self, waiting: Sequence[RequestView], running: Sequence[RequestView],
                   budget: Budget) -> list[Unit]:
        if not budget.free_kv_blocks:
            return []
        gpu = next(iter(budget.free_kv_blocks))  # the cluster's first device
        only_gpu = Budget(budget.max_tokens, budget.max_seqs,
                          {gpu: budget.free_kv_blocks[gpu]}, budget.kv_block_size,
                          budget.units_in_flight)
        return BatchEP().form_units(waiting, running, only_gpu)

    def split(self, unit: Unit) -> tuple[tuple[int, ...], ...]:
        if self.micro_batch_tokens is not None and all(
                s.num_tokens == 1 and s.start > 0 for s in unit.seqs):  # decodes alone
            return pack_by_tokens(unit, self.micro_batch_tokens,
                                  self.micro_batches or LOOKAHEAD + 1)
        return algorithm2(unit, self.micro_batches, self.micro_batch_size)

    def plan_key(self, unit: Unit) -> Hashable:
        # token counts too: the activations sent to the host are sized when compiled; and
        # which sequences start fresh: a micro-batch of them is prefilled on the GPU
        return (unit_shape(unit), self.split(unit), tuple(s.num_tokens for s in unit.seqs),
                tuple(s.start == 0 for s in unit.seqs))

    # -- planning --------------------------------------------------------------------

    def cut(self, unit: Unit, model: ModelSpec, cluster: Cluster) -> OffloadCut:
        gpu, host = cluster.devices[0], cluster.devices[-1]
        split = self.split(unit) if self.cpu_attention else (tuple(range(len(unit.seqs))),)
        cpu_attention = self.cpu_attention and model.attention.kind != "mla"
        return OffloadCut(gpu, host, split, cpu_attention,
                          self.pages or (len(split) if self.cpu_attention else 1))

    def reserved_weights(self, model: ModelSpec, cluster: Cluster) -> dict[str, int]:
        """The GPU's double buffer: two layers of the experts it pages in; and on each
        owner that pages experts in, its pinned relay: `RELAY_SLOTS` pages, each taken as
        a whole layer of its experts (a unit of one micro-batch pages a layer at once)."""
        gpu = cluster.devices[0]
        offloaded = sum(1 for e in range(cluster.placement.num_experts)
                        if cluster.placement.owner(e) != gpu)
        if not offloaded or not model.moe_layers:
            return {}
        out = {gpu: 2 * offloaded * model.expert_params()}
        for owner in cluster.placement.owners():
            if owner != gpu:
                out[owner] = out.get(owner, 0) + RELAY_SLOTS * len(
                    cluster.placement.experts_of(owner)) * model.expert_params()
        return out

    def capped_placement(self, model: ModelSpec, devices: Sequence[str], weight_bytes: int,
                         gpu_memory: float) -> Placement:
        """The experts the GPU (the first device) keeps under `gpu_memory` bytes of weights:
        as many as fit beside its dense weights and the double buffer for the others,
        which the host (the last device) holds and pages in. Refused, before anything runs,
        when even all of them on the host leave the GPU over its cap."""
        devices = tuple(devices)
        if len(devices) < 2:
            raise ValueError(f"a GPU memory cap needs a GPU and a host: two devices at least, "
                             f"got {', '.join(devices)}")
        num_experts = model.moe.num_experts
        dense = (model.total_params() - len(model.moe_layers) * num_experts
                 * model.expert_params()) * weight_bytes
        per_expert = len(model.moe_layers) * model.expert_params() * weight_bytes
        host = len(devices) - 1
        for resident in range(num_experts, -1, -1):
            placement = Placement(devices, (0,) * resident + (host,) * (num_experts - resident))
            buffer = self.reserved_weights(model, Cluster(devices, placement)).get(devices[0], 0)
            need = dense + resident * per_expert + buffer * weight_bytes
            if need <= gpu_memory:
                return placement
        raise ValueError(f"a GPU memory cap of {gpu_memory:,.0f} B is too small for {self.name}: with "
                         f"every expert on the host, the GPU still holds {dense:,} B of dense "
                         f"weights and {need - dense:,} B of double buffer ({need:,} B)")

    def kv_devices(self, model: ModelSpec, cluster: Cluster) -> dict[str, str]:
        """With CPU attention, the KV cache lives on the host."""
        gpu, host = cluster.devices[0], cluster.devices[-1]
        if self.cpu_attention and model.attention.kind != "mla" and host != gpu:
            return {gpu: host}
        return {}

    def plan(self, unit: Unit, model: ModelSpec, cluster: Cluster) -> Plan:
        cut = self.cut(unit, model, cluster)
        graph, ids = compile_offload(model, unit, cluster.placement, cut)
        return pipeline_plan(graph, ids, cut)


class FlexGen(CGOPipe):
    name = "flexgen"
    cpu_attention = False

    def __init__(self) -> None:
        super().__init__(micro_batches=1, pages=1)


def pipeline_plan(graph: Graph, ids: OffloadNodes, cut: OffloadCut) -> Plan:
    """Every stream in the paper's issue order (see the module docstring)."""
    gpu, host = cut.gpu, cut.host
    n = len(cut.micro_batches)
    layers = len(ids.pre)
    steps = layers * n
    ahead = min(LOOKAHEAD, n)
    assignment: list[Stream | None] = [None] * len(graph.nodes)
    orders: dict[Stream, list[int]] = {}

    def issue(node: int, stream: Stream) -> None:
        if node < 0:
            return
        assignment[node] = stream
        orders.setdefault(stream, []).append(node)

    compute, d2h = Stream(gpu, "compute"), Stream(gpu, "d2h")
    host_compute, h2d = Stream(host, "compute"), Stream(host, "h2d")

    def pages(layer: int, slot: int | None) -> None:
        """Layer `layer`'s pages (those for micro-batch slot `slot`, or all), each on its
        owner's h2d stream, after its copy into the pinned relay on the owner's pin stream
        (pins go in the pages' order: each waits for its slot's last page to cross)."""
        if layer >= layers:
            return
        page_ids = ids.pages[layer]
        for p, page in enumerate(page_ids):
            if slot is None or p * n // len(page_ids) == slot:
                owner = graph.nodes[page].src  # type: ignore[union-attr]
                for pin in graph.inputs(page):
                    issue(pin, Stream(owner, "pin"))
                issue(page, Stream(owner, "h2d"))

    def pre(k: int) -> None:
        i, j = divmod(k, n)
        if i == 0:
            issue(ids.embed[j], compute)
        issue(ids.pre[i][j], compute)
        issue(ids.qkv[i][j], d2h)
        issue(ids.core[i][j], host_compute)

    pages(0, None)
    for k in range(min(ahead, steps)):
        pre(k)
    for k in range(steps):
        i, j = divmod(k, n)
        issue(ids.back[i][j], h2d)
        pages(i + 1, j)
        for node in ids.post[i][j]:
            issue(node, compute)
        if i == layers - 1:
            issue(ids.head[j], compute)
        if k + ahead < steps:
            pre(k + ahead)
    missing = [i for i, s in enumerate(assignment) if s is None]
    if missing:
        raise GraphError(f"the pipeline order leaves nodes {missing[:8]} unplaced")
    streams = tuple(s for s in assignment if s is not None)
    return Plan(graph, streams,
                tuple((s, InOrder(tuple(o))) for s, o in sorted(orders.items())))


__all__ = ["CGOPipe", "FlexGen", "algorithm2", "pack_by_tokens", "pipeline_plan"]
