"""eps: EPS-MoE expert pipelining, for prefill throughput (arXiv 2410.12247).

The paper (DeepSeek-V2 on 8×H800: 100K -> 121.8K tok/s prefill, +21 % on average over
Mixtral, DBRX and DeepSeek-V2) hides an MoE layer's all-to-all behind its expert GEMMs:

- Each owner's experts are cut into PN groups of E/PN. Stage p dispatches only the rows
  routed to group p, runs one GEMM over those experts, then combines:
  dispatch(p) -> GEMM(p) -> combine(p). The dispatch of stage p+1 overlaps GEMM(p), and
  combine(p) overlaps GEMM(p+1).
- Splitting costs something (more, smaller messages and launches), so pipelining is on only
  when it costs little: with S(m) the dispatch + combine time of m rows and G(m, E) the
  GEMM time of m rows over E experts,
      N·S(m/N) / S(m) <= 1 + eps0   and   N·G(m/N, E/N) / G(m, E) <= 1 + eps1,
  eps0 = 0.32 and eps1 = 0.03 in the paper (for DeepSeek-V2 that held for m >= 1700).
- The pipelined layer takes about max(T_comm, T_comp) + C/N + R(N), C = min(T_comm,
  T_comp), with the overhead R(N) ≈ kN + b, so the best N is PN* = sqrt(C/k), rounded to
  a divisor of E. The paper used PN = 5 for DeepSeek-V2 and 2 for Mixtral and DBRX.

What moeflow does (`EPS(stages=None, costs=None, eps0=0.32, eps1=0.03,
kernel_band=(128, 256), micro_batches=None)`):

- Batching as batch-ep (`BatchEP.form_units`: one batch step at a time, long prompts
  prefilled in chunks of the token budget), and a barrier at every layer.
- The graph is `compile(..., Cut(expert_stages=PN, barrier=True))`: each owner's experts in
  PN contiguous groups, each its own dispatch -> Expert -> combine stage. Rows are split by
  the group they route to (stage p carries only group p's rows, about m/PN of them); a long
  prompt's tokens are not split further here: the token budget already chunks it.
- Every stream issues in one static order (InOrder), a linear extension of the graph, so
  the plan holds every ordering and any executor runs it the same: on a device's `send`
  stream, dispatch(0), dispatch(1), combine(0), dispatch(2), combine(1), ...: dispatch(p+1)
  goes out before combine(p) waits on GEMM(p), so it overlaps that GEMM on the owner; on
  `compute`, attention, gate, the shared expert (overlapping dispatch(0)), GEMM(0..PN-1),
  then the combine.
- PN: from the layer's expected load (the unit's tokens times top-k, spread over the
  experts; rows from other homes cross a link), C = min(T_comm, T_comp) over the busiest
  owner, the divisor N of every owner's expert count that minimises C/N + kN (the two
  divisors around PN*), then the largest divisor at most that which passes the enabling
  rule, else 1. A fixed `stages` overrides the rule (rounded down to such a divisor).
- Costs come from a `StageCosts` (comm_s, gemm_s, stage_overhead_s); without one, the
  analytic model `AnalyticCosts.defaults(model)` with figures of the local CPU actors.
  `moeflow.sim.eps_costs.RooflineStageCosts` reads them off the simulator's cost model for
  a hardware preset and dtype; `moeflow simulate --scheduler eps` uses it.
- Plans are shared per (unit shape, token bucket): PN is chosen at the bucket's lower
  bound (the largest 2^j or 1.5·2^j at most the unit's tokens), so one plan serves every
  unit in the bucket, and pipelining never starts below the threshold (both ratios only
  fall as m grows).

- Tokens split by rows (two-batch overlap): where every home holds at least two
  sequences, `Cut(micro_batches=2)` deals each home's sequences (its prefill chunks, then
  its decodes, in turn: `moeflow.dataflow.compiler.cut_seqs`) into two micro-batches, each
  its own chain Embed -> ... -> LMHead with its own gates, dispatches, expert GEMMs and combines (a barrier per micro-batch). Per layer each device
  issues micro-batch 0's attention, gate, shared expert and dispatches, then micro-batch
  1's, then the GEMMs of 0 and of 1, and each micro-batch's Combine just before its
  attention of the next layer: micro-batch 1 attends while 0's rows cross the links, and
  0's GEMMs run while 1's do, so the all-to-all hides behind attention too. The policy
  takes it instead of the stages (PN = 1 then) where the enabling rule holds for the rows
  cut in two (N·S(m/N)/S(m) <= 1 + eps0 and N·G(m/N, E)/G(m, E) <= 1 + eps1, N = 2) and
  the modelled layer is faster so (`micro_pays`: max(T_comm, (T_comp + T_rest)/share) + 2k
  against the staged layer plus T_rest, T_rest the layer's attention, gate, shared expert
  and combine as `StageCosts.rest_s` gives it, and every kernel on the SM share, since all
  of them run beside communication). To give every home two sequences, `chunk_limit` takes
  a long prompt in halves of a home's share of the budget while there are prompts enough
  to prefill (twice the homes) to pair up. `micro_batches=M` fixes M instead (at most the
  fewest sequences a home holds), with PN then chosen at a micro-batch's tokens; a fixed
  `stages` alone keeps one micro-batch.

- The SM partition (the paper capped the GEMM at 116 of 132 SMs, leaving 16 for
  communication) is the simulator's to charge (`moeflow.sim.cost.GEMM_SM_SHARE`); a
  StageCosts that states it (`pipelined_gemm_share`, as `moeflow.sim.eps_costs`'s does)
  makes the policy keep PN = 1 where the slower GEMM costs more than the overlap saves:
  max(T_comm, T_comp') + C'/N + kN >= T_comm + T_comp + k (`EPS.pays`).

- The kernel choice, through `on_routing` once a layer's gate counts are known: each
  stage's expert group runs on GroupGemm (one grouped call over its experts) while the rows
  routed to it, per expert of the group, stay below `kernel_band[0]`, on DenseGemm (a GEMM
  per expert) above `kernel_band[1]`, and in between keeps the kernel it last ran on for
  that layer (a hysteresis band, so a load near the crossover does not flip every step).
  The default band is the paper's measurement (GroupGemm the faster below 2048 tokens,
  DenseGemm above 4096, for a [1536, 5120] expert and 16 experts, on H800: 128 and 256
  rows per expert). On CPU actors the engine gives the band of the local kernels' measured
  crossover instead (`cpu_kernel_band`); `moeflow simulate` turns it off (its cost model
  never finds DenseGemm the faster: `moeflow.sim.eps_costs.with_hardware_costs`);
  `kernel_band=None` leaves the choice to the executor. The choice never changes results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from moeflow.dataflow.compiler import Cut, compile
from moeflow.dataflow.graph import (
    Attention, Combine, Embed, Expert, Gate, Graph, LMHead, Node, Placement, Transfer, Unit,
)
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.base import DENSE, GROUPED, Budget, Cluster, RequestView, unit_shape
from moeflow.scheduler.batch_ep import BatchEP
from moeflow.scheduler.plan import InOrder, Plan, PlanError, Stream, node_stream

EPS0 = 0.32  # communication split tolerance of the paper
EPS1 = 0.03  # GEMM split tolerance of the paper
# rows routed to an expert group, per expert of it: GroupGemm below, DenseGemm above, the
# last choice between
KERNEL_BAND = (128, 256)


class StageCosts(Protocol):
    """What the enabling rule and PN* need to know about a layer's costs.

    Optional: `pipelined_gemm_share`, the fraction of the GEMM's unpipelined throughput it
    keeps while communication runs beside it (the SM partition; 1.0 when absent); and
    `rest_s(tokens)`, the rest of a layer's compute on a home of `tokens` prefill tokens
    (attention, gate, shared expert, combine), which micro-batches hide communication
    behind too (0 when absent)."""

    @property
    def stage_overhead_s(self) -> float:
        """k: seconds one more pipeline stage adds to a layer (R(N) ≈ kN + b)."""
        ...

    def comm_s(self, rows: float) -> float:
        """Dispatch plus combine time of `rows` routed rows of one layer into one owner."""
        ...

    def gemm_s(self, rows: float, experts: int) -> float:
        """Time of one GEMM stage over `rows` routed rows spread over `experts` experts."""
        ...


@dataclass(frozen=True, slots=True)
class AnalyticCosts:
    """StageCosts from plain numbers.

        comm_s(m)    = 2·(link_latency + m·D·b / link_bandwidth)    (dispatch and combine)
        gemm_s(m, n) = launch_s + 6·D·F·m / (gemm_flops · eff(m/n)),
                       eff(r) = r / (r + gemm_half_rows)             (falls for few rows)

    D hidden size, F expert FFN width, b bytes per element; a SwiGLU expert does 6·D·F
    FLOPs per row (gate, up, down). The defaults are the local CPU actors over zmq."""

    hidden_size: int
    expert_width: int
    bytes_per_element: int = 2
    link_bandwidth: float = 4e9  # bytes/s, one direction
    link_latency: float = 50e-6  # s per message
    gemm_flops: float = 1e11  # FLOP/s at full efficiency
    gemm_half_rows: float = 16.0  # rows per expert at half of gemm_flops
    launch_s: float = 20e-6  # one more GEMM launch (op dispatch)
    stage_overhead_s: float = 100e-6  # k: a stage's extra nodes and messages per layer

    def __post_init__(self) -> None:
        if self.hidden_size < 1 or self.expert_width < 1 or self.bytes_per_element < 1:
            raise ValueError(f"hidden_size, expert_width and bytes_per_element must be >= 1, "
                             f"got {self.hidden_size}, {self.expert_width}, "
                             f"{self.bytes_per_element}")
        if self.link_bandwidth <= 0 or self.gemm_flops <= 0:
            raise ValueError("link_bandwidth and gemm_flops must be > 0")
        if min(self.link_latency, self.gemm_half_rows, self.launch_s,
               self.stage_overhead_s) < 0:
            raise ValueError("latencies, overheads and gemm_half_rows must be >= 0")

    @staticmethod
    def defaults(model: ModelSpec) -> AnalyticCosts:
        return AnalyticCosts(model.hidden_size, model.moe.intermediate_size, model.dtype_bytes)

    def comm_s(self, rows: float) -> float:
        if rows <= 0:
            return 0.0
        return 2 * (self.link_latency
                    + rows * self.hidden_size * self.bytes_per_element / self.link_bandwidth)

    def gemm_s(self, rows: float, experts: int) -> float:
        if rows <= 0:
            return 0.0
        per_expert = rows / max(experts, 1)
        efficiency = per_expert / (per_expert + self.gemm_half_rows)
        flops = 6 * self.hidden_size * self.expert_width * rows
        return self.launch_s + flops / (self.gemm_flops * efficiency)


@dataclass(frozen=True, slots=True)
class LayerLoad:
    """The expected routed load of one MoE layer, per owner: (rows routed to its experts,
    of them the rows from other homes, its expert count). Tokens are taken as spread evenly
    over the unit's homes and each token's top-k over all experts."""

    owners: tuple[tuple[float, float, int], ...]

    @staticmethod
    def of(model: ModelSpec, placement: Placement, homes: tuple[str, ...],
           num_tokens: int) -> LayerLoad:
        e, k = model.moe.num_experts, model.moe.top_k
        out = []
        for owner in placement.owners():
            n = len(placement.experts_of(owner))
            rows = num_tokens * k * n / e
            local = 1 / len(homes) if owner in homes else 0.0
            out.append((rows, rows * (1 - local), n))
        return LayerLoad(tuple(out))

    def divisors(self) -> tuple[int, ...]:
        """The stage counts that split every owner's experts evenly."""
        g = 0
        for _, _, n in self.owners:
            g = math.gcd(g, n)
        return tuple(d for d in range(1, g + 1) if g % d == 0)

    def comm_s(self, costs: StageCosts, stages: int = 1) -> float:
        """S: one stage's dispatch + combine time on the busiest owner."""
        return max((costs.comm_s(remote / stages) for _, remote, _ in self.owners), default=0.0)

    def gemm_s(self, costs: StageCosts, stages: int = 1) -> float:
        """G: one stage's GEMM time on the busiest owner."""
        return max((costs.gemm_s(rows / stages, n // stages) for rows, _, n in self.owners),
                   default=0.0)

    def row_ratios(self, costs: StageCosts, parts: int) -> tuple[float, float]:
        """N·S(m/N)/S(m) and N·G(m/N, E)/G(m, E) at N = `parts`: the rows cut into parts,
        each over every expert (micro-batches)."""
        s = self.comm_s(costs)
        g = self.gemm_s(costs)
        cut = max((costs.gemm_s(rows / parts, n) for rows, _, n in self.owners), default=0.0)
        return (parts * self.comm_s(costs, parts) / s if s > 0 else 1.0,
                parts * cut / g if g > 0 else 1.0)

    def ratios(self, costs: StageCosts, stages: int) -> tuple[float, float]:
        """N·S(m/N)/S(m) and N·G(m/N, E/N)/G(m, E) at N = `stages` (1.0 where the
        unsplit time is zero: nothing to split)."""
        s, g = self.comm_s(costs), self.gemm_s(costs)
        return (stages * self.comm_s(costs, stages) / s if s > 0 else 1.0,
                stages * self.gemm_s(costs, stages) / g if g > 0 else 1.0)


@dataclass(frozen=True, slots=True)
class StageChoice:
    """How PN was chosen for a unit, for tests and benchmarks to print."""

    stages: int  # PN
    num_tokens: int  # the token count it was chosen at (the unit's bucket)
    comm_s: float  # T_comm of a layer, unsplit, on the busiest owner
    gemm_s: float  # T_comp
    target: float  # PN* = sqrt(C / k)
    comm_ratio: float  # N·S(m/N)/S(m) at N = stages
    gemm_ratio: float  # N·G(m/N, E/N)/G(m, E)
    reason: str  # "fixed", "pipelined", "below the enabling threshold", "PN* rounds to 1",
    # "nothing to overlap" (no rows cross a link), "the experts of some owner do not split",
    # "the SM partition costs more than the overlap saves", "micro-batched"
    micro_batches: int = 1  # M: the unit's sequences cut into M chains (two-batch overlap);
    # where eps chose M > 1 itself, the ratios above are at N = M, the rows cut in M


def checked_band(band: tuple[float, float] | None) -> tuple[float, float] | None:
    if band is None:
        return None
    low, high = band
    if not 0 <= low <= high:
        raise ValueError(f"kernel_band must be (low, high) rows per expert with "
                         f"0 <= low <= high, got {band}")
    return (low, high)


def cpu_kernel_band(crossover: int) -> tuple[float, float]:
    """The band around the CPU kernels' measured crossover (rows per expert up to which the
    fused grouped kernel is the faster; moeflow.ops.cpu.choice): a quarter either side."""
    return (0.75 * crossover, 1.25 * crossover)


def token_bucket(num_tokens: int) -> int:
    """The largest 2^j or 1.5·2^j that is at most `num_tokens` (for n >= 1)."""
    if num_tokens < 2:
        return num_tokens
    p = 1 << (num_tokens.bit_length() - 1)
    return p + p // 2 if num_tokens >= p + p // 2 else p


class EPS(BatchEP):
    name = "eps"

    def __init__(self, stages: int | None = None, costs: StageCosts | None = None,
                 eps0: float = EPS0, eps1: float = EPS1,
                 kernel_band: tuple[float, float] | None = KERNEL_BAND,
                 micro_batches: int | None = None) -> None:
        if stages is not None and stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        if micro_batches is not None and micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if eps0 < 0 or eps1 < 0:
            raise ValueError(f"eps0 and eps1 must be >= 0, got {eps0}, {eps1}")
        self.stages = stages
        self.micro_batches = micro_batches
        self.costs = costs
        self.eps0 = eps0
        self.eps1 = eps1
        self.kernel_band = checked_band(kernel_band)
        self._last: dict[tuple[int, tuple[int, ...]], str] = {}  # (layer, group) -> kernel

    def on_routing(self, unit: Unit, layer: int, counts: tuple[int, ...],
                   groups: tuple[tuple[int, ...], ...]) -> dict[tuple[int, ...], str] | None:
        if self.kernel_band is None:
            return None
        low, high = self.kernel_band
        out = {}
        for group in groups:
            rows = sum(counts[e] for e in group) / len(group)
            key = (layer, group)
            kernel = GROUPED if rows < low else DENSE if rows > high else self._last.get(
                key, GROUPED)
            self._last[key] = kernel  # bounded: layers x groups of the plans met
            out[group] = kernel
        return out

    def chunk_limit(self, waiting: Sequence[RequestView], running: Sequence[RequestView],
                    budget: Budget) -> int:
        """Half a home's share of the budget while there are prompts enough to prefill (two
        per home) for the halves to pair up as micro-batches, else all of it (a lone long
        prompt among decodes is not cut for nothing)."""
        homes = max(len(budget.free_kv_blocks), 1)
        if self.micro_batches == 1 or (self.micro_batches is None and self.stages is not None):
            return budget.max_tokens
        prefilling = sum(1 for r in (*waiting, *running) if r.num_pending > 1)
        if prefilling < 2 * homes:
            return budget.max_tokens
        return max(1, budget.max_tokens // (2 * homes))

    def plan_key(self, unit: Unit) -> Hashable:
        if self.stages is not None:
            return unit_shape(unit)
        return (unit_shape(unit), token_bucket(unit.num_tokens))

    def plan(self, unit: Unit, model: ModelSpec, cluster: Cluster) -> Plan:
        chosen = self.choice(unit, model, cluster)
        return pipelined_plan(compile(model, unit, cluster.placement,
                                      Cut(expert_stages=chosen.stages, barrier=True,
                                          micro_batches=chosen.micro_batches)))

    def chosen_stages(self, unit: Unit, model: ModelSpec, cluster: Cluster) -> int:
        """PN for `unit`: its plan cuts each owner's experts into this many stages."""
        return self.choice(unit, model, cluster).stages

    def stage_costs(self, model: ModelSpec) -> StageCosts:
        return self.costs if self.costs is not None else AnalyticCosts.defaults(model)

    def load(self, unit: Unit, model: ModelSpec, cluster: Cluster,
             num_tokens: int | None = None) -> LayerLoad:
        """The unit's expected layer load, at `num_tokens` (default: its bucket)."""
        tokens = token_bucket(unit.num_tokens) if num_tokens is None else num_tokens
        return LayerLoad.of(model, cluster.placement, unit.homes(cluster.placement.devices),
                            tokens)

    def enabled(self, load: LayerLoad, costs: StageCosts, stages: int) -> bool:
        """The paper's enabling rule at N = `stages`."""
        comm, gemm = load.ratios(costs, stages)
        return comm <= 1 + self.eps0 and gemm <= 1 + self.eps1

    def choice(self, unit: Unit, model: ModelSpec, cluster: Cluster) -> StageChoice:
        """PN and M for `unit`: the stages as the paper chooses them, then micro-batches
        instead where every home holds two sequences and the modelled layer is faster so
        (`micro_pays`)."""
        homes = unit.homes(cluster.placement.devices)
        most = min(len(unit.seqs_on(h)) for h in homes)
        if self.micro_batches is not None:
            m = max(1, min(self.micro_batches, most))
            share = None if m == 1 else max(1, token_bucket(unit.num_tokens) // m)
            return replace(self.stage_choice(unit, model, cluster, share), micro_batches=m)
        staged = self.stage_choice(unit, model, cluster)
        if self.stages is not None or most < 2 or staged.comm_s <= 0:
            return staged
        costs = self.stage_costs(model)
        load = self.load(unit, model, cluster, staged.num_tokens)
        comm_ratio, gemm_ratio = load.row_ratios(costs, 2)
        if comm_ratio > 1 + self.eps0 or gemm_ratio > 1 + self.eps1:
            return staged
        rest = float(getattr(costs, "rest_s", lambda _: 0.0)(staged.num_tokens / len(homes)))
        if not self.micro_pays(staged, costs, rest):
            return staged
        return StageChoice(1, staged.num_tokens, staged.comm_s, staged.gemm_s, staged.target,
                           comm_ratio, gemm_ratio, "micro-batched", 2)

    @staticmethod
    def micro_pays(staged: StageChoice, costs: StageCosts, rest: float) -> bool:
        """Whether two micro-batches, max(T_comm, (T_comp + T_rest)/share) + 2k (each hides
        its all-to-all behind the other's whole layer, every kernel beside communication),
        beat the layer as `staged` runs it (`pays`'s pipelined time, or T_comm + T_comp + k,
        plus T_rest)."""
        share = float(getattr(costs, "pipelined_gemm_share", 1.0))
        comm, gemm, k, n = staged.comm_s, staged.gemm_s, costs.stage_overhead_s, staged.stages
        slowed = gemm / share
        base = (max(comm, slowed) + min(comm, slowed) / n + k * n if n > 1
                else comm + gemm + k) + rest
        return max(comm, (gemm + rest) / share) + 2 * k < base

    def stage_choice(self, unit: Unit, model: ModelSpec, cluster: Cluster,
                     tokens: int | None = None) -> StageChoice:
        """PN for `unit` as the paper chooses it (see the module docstring), at `tokens`
        (default: the unit's bucket; a micro-batch's share of it when micro-batched)."""
        costs = self.stage_costs(model)
        tokens = token_bucket(unit.num_tokens) if tokens is None else tokens
        load = self.load(unit, model, cluster, tokens)
        divisors = load.divisors() or (1,)
        comm, gemm = load.comm_s(costs), load.gemm_s(costs)
        c, k = min(comm, gemm), costs.stage_overhead_s
        target = math.sqrt(c / k) if k > 0 else math.inf

        def chose(n: int, reason: str) -> StageChoice:
            return StageChoice(n, tokens, comm, gemm, target, *load.ratios(costs, n), reason)

        if self.stages is not None:
            return chose(max(d for d in divisors if d <= self.stages), "fixed")
        if c <= 0:
            return chose(1, "nothing to overlap")
        if divisors == (1,):
            return chose(1, "the experts of some owner do not split")
        # the modelled pipelined time is convex in N: the best divisor is one beside PN*
        best = min(divisors, key=lambda n: (c / n + k * n, n))
        if best == 1:
            return chose(1, "PN* rounds to 1")
        for n in sorted((d for d in divisors if 1 < d <= best), reverse=True):
            if self.enabled(load, costs, n):
                if not self.pays(comm, gemm, costs, n):
                    return chose(1, "the SM partition costs more than the overlap saves")
                return chose(n, "pipelined")
        return chose(1, "below the enabling threshold")

    @staticmethod
    def pays(comm: float, gemm: float, costs: StageCosts, stages: int) -> bool:
        """Whether the pipelined layer, max(T_comm, T_comp') + C'/N + kN with T_comp' the
        GEMM slowed by the SM partition and C' = min(T_comm, T_comp'), beats the unpipelined
        T_comm + T_comp + k. Without a partition (share 1) this is what choosing N over 1
        by C/N + kN already says."""
        share = float(getattr(costs, "pipelined_gemm_share", 1.0))
        slowed = gemm / share
        k = costs.stage_overhead_s
        pipelined = max(comm, slowed) + min(comm, slowed) / stages + k * stages
        return pipelined < comm + gemm + k

    @classmethod
    def conformance_checks(cls) -> list[Callable[[Any, Any], list[str]]]:
        """Invariant 7's enabling rule, judged with this policy's own costs (the rest of
        invariant 7 is registered for every policy named "eps")."""
        # imported by name: moeflow.testing needs Hypothesis and the simulator, and a plain
        # import would pull them into scheduler/'s strict type check
        import importlib

        rule: Callable[[EPS], Callable[[Any, Any], list[str]]] = getattr(
            importlib.import_module("moeflow.testing.eps"), "enabling_rule")
        return [rule(cls())]


def issue_key(graph: Graph, node: Node, m: int = 0, micro_batches: int = 1
              ) -> tuple[int, ...]:
    """Where a node of micro-batch `m` goes in the pipeline's one issue order.

    One micro-batch: by layer; in a layer attention, gate, shared expert, then stage slots
    (dispatch(p) and GEMM(p) in slot p, combine(p) in slot p+1, after dispatch(p+1)), then
    the combine.

    M micro-batches (two-batch overlap): per layer, the fronts of micro-batches 0..M-1
    (attention, gate, shared expert, and their dispatches), then their GEMMs with the
    combines they send, then each micro-batch's Combine just before its front of the next
    layer: on a device, micro-batch 1's attention runs while micro-batch 0's rows cross the
    links, and micro-batch 0's GEMMs while micro-batch 1's do."""
    if isinstance(node, Embed):
        return (-1, m, 0, 0, 0)
    if isinstance(node, LMHead):
        return (2 * micro_batches * (graph.num_layers + 1), 0, 0, 0, 0)
    if micro_batches == 1:
        return (0, *_one_batch_key(node))
    layer = node.layer
    front, back = 2 * micro_batches * layer + m, 2 * micro_batches * layer + micro_batches + m
    if isinstance(node, Combine):  # before the next layer's front of its micro-batch
        return (front + 2 * micro_batches, 0, 0, 0, 0)
    if isinstance(node, Attention):
        return (front, 1, 0, 0, 0)
    if isinstance(node, Gate):
        return (front, 2, 0, 0, 0)
    if isinstance(node, Expert):
        return (back, 0, node.stage, 0, 0) if node.kind == "routed" else (front, 3, 0, 0, 0)
    if isinstance(node, Transfer) and node.payload == "dispatch":
        return (front, 4, node.stage, 0, 0)
    if isinstance(node, Transfer) and node.payload == "combine":
        return (back, 0, node.stage, 1, 0)
    raise PlanError(f"eps has no place in its pipeline for {node!r}")


def _one_batch_key(node: Node) -> tuple[int, int, int, int]:
    if isinstance(node, Attention):
        return (node.layer, 0, 0, 0)
    if isinstance(node, Gate):
        return (node.layer, 1, 0, 0)
    if isinstance(node, Expert):
        return (node.layer, 3, node.stage, 1) if node.kind == "routed" else (node.layer, 2, 0, 0)
    if isinstance(node, Transfer) and node.payload == "dispatch":
        return (node.layer, 3, node.stage, 0)
    if isinstance(node, Transfer) and node.payload == "combine":
        return (node.layer, 3, node.stage + 1, 2)
    if isinstance(node, Combine):
        return (node.layer, 4, 0, 0)
    raise PlanError(f"eps has no place in its pipeline for {node!r}")


def micro_batches_of(graph: Graph) -> tuple[int, dict[int, int]]:
    """M, and each node's micro-batch by id: an Expert's or Transfer's field, a node with
    sequences its sequences' (`Graph.micro_batch_of_seq`)."""
    of_seq = graph.micro_batch_of_seq
    out = {}
    for node in graph.nodes:
        if isinstance(node, (Expert, Transfer)):
            out[node.id] = node.micro_batch
        elif node.seqs:
            out[node.id] = of_seq[node.seqs[0]]
    return graph.num_micro_batches, out


def shape_of(graph: Graph) -> tuple[int, int]:
    """(PN, M) of an eps graph: its expert stages and its micro-batches."""
    stages = max((n.stage + 1 for n in graph.nodes
                  if isinstance(n, Expert) and n.kind == "routed"), default=1)
    return stages, graph.num_micro_batches


def pipelined_plan(graph: Graph) -> Plan:
    """Every node on its default stream (compute; a transfer on its sender's `send`), each
    stream issuing in `issue_key` order (ties in topological order)."""
    topo = {node_id: i for i, node_id in enumerate(graph.topological_order())}
    micro_batches, of = micro_batches_of(graph)
    keys = [issue_key(graph, node, of.get(node.id, 0), micro_batches) for node in graph.nodes]
    for edge in graph.edges:  # the order must extend the graph's, or streams could deadlock
        if keys[edge.src] > keys[edge.dst]:
            raise PlanError(f"eps would issue node {edge.dst} before its predecessor "
                            f"{edge.src}")
    assignment = tuple(node_stream(graph, i) for i in range(len(graph.nodes)))
    orders: dict[Stream, list[int]] = {}
    for node_id in sorted(range(len(graph.nodes)), key=lambda i: (keys[i], topo[i])):
        orders.setdefault(assignment[node_id], []).append(node_id)
    return Plan(graph, assignment,
                tuple((s, InOrder(tuple(o))) for s, o in sorted(orders.items())))
