"""The eps policy's `StageCosts` from the simulator's own cost model, for a (model, hardware,
dtype): what PN the policy picks is then judged by the same numbers the simulation charges.

    costs = RooflineStageCosts.of(models.load("deepseek-v2"), hardware.load("h800x8"), "fp8")
    EPS(costs=costs)

- S(m), `comm_s`: a layer's dispatch plus combine into one owner of m rows from other
  homes, as the simulator charges them on a device's serial `send` stream: one message to
  each of the other N-1 devices each way, each the link's latency plus its bytes at the
  link's bandwidth (activations: the cost model's activation bytes, bf16 under fp8).
- G(m, E), `gemm_s`: the routed Expert node's duration in the cost model (`routed_cost`:
  the roofline of its GEMMs at the dtype's FLOP/s and the efficiency curve m/(m + half),
  plus its elementwise passes), less its kernel launches, unpipelined (all SMs). The
  paper's eps1 = 0.03 judges how much a GEMM loses to being cut; fixed per-stage costs are
  k's, not G's, and the SM partition is charged by the simulator, not weighed here.
- k, `stage_overhead_s`: what one more stage adds to the busier of a layer's two streams:
  on `compute`, the Expert node's kernel launches (5 × 4 µs on the GPU presets = 20 µs);
  on `send`, one more dispatch and combine message to every other device (2·(N-1)·3 µs =
  42 µs on an 8-GPU NVLink node, 18 µs on 4). k is the larger: 42 µs on h800x8, 20 µs on
  h800x4. The paper fits R(N) ≈ kN + b from measurements; ours is that same line read off
  the cost model.
- `pipelined_gemm_share`: the cost model's SM partition (116/132 on a GPU, 1 on a CPU),
  so the policy keeps PN = 1 where the slower GEMM would cost more than the overlap saves.

Pure: arithmetic on ModelSpec and Hardware.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from moeflow.dataflow.graph import Attention, Combine, Expert, Gate, Node, SeqChunk, Unit
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.base import Scheduler
from moeflow.scheduler.eps import EPS
from moeflow.sim.cost import KERNELS, CostModel
from moeflow.sim.hardware import Hardware


@dataclass(frozen=True, slots=True)
class RooflineStageCosts:
    """`moeflow.scheduler.eps.StageCosts` read off a CostModel (see the module docstring)."""

    cost: CostModel
    stage_overhead_s: float
    pipelined_gemm_share: float = 1.0  # of G's throughput while pipelining (SM partition)

    @staticmethod
    def of(spec: ModelSpec, hw: Hardware, dtype: str | None = None) -> RooflineStageCosts:
        cost = CostModel(spec, hw, dtype)
        return RooflineStageCosts(cost, stage_overhead(cost), cost.sm_share)

    def comm_s(self, rows: float) -> float:
        if rows <= 0:
            return 0.0
        link, peers = self.cost.hw.link, max(self.cost.hw.num_devices - 1, 1)
        row_bytes = self.cost.spec.hidden_size * self.cost.b
        return 2 * (peers * link.latency + rows * row_bytes / link.bandwidth)

    def gemm_s(self, rows: float, experts: int) -> float:
        if rows <= 0:
            return 0.0
        c = self.cost.routed_cost(rows, max(experts, 1))
        return self.cost.time_of(_ROUTED, c) - c.kernels * self.cost.hw.device.launch_overhead


    def rest_s(self, tokens: float) -> float:
        """The rest of an MoE layer's compute on a home of `tokens` tokens, as one fresh
        prompt: attention, gate, shared expert (if any) and combine, on all SMs. A plan is
        shared by the units of its shape and token bucket, whatever their starts, so this
        takes no start: for a burst of prompts taken in halves, two per home, one prompt of
        a home's tokens is what the two steps attend on average (the first halves less,
        the second halves, over their first halves too, more)."""
        t = max(int(tokens), 1)
        spec, dev = self.cost.spec, self.cost.hw.device_names()[0]
        layer = spec.moe_layers[0] if spec.moe_layers else 0
        unit = Unit((SeqChunk(0, 0, t, dev),))
        nodes: list[Node] = [Attention(0, dev, layer, (0,), t, t), Gate(0, dev, layer, (0,), t),
                             Combine(0, dev, layer, (0,), t)]
        if spec.moe.shared_intermediate_size:
            nodes.append(Expert(0, dev, layer, kind="shared", num_tokens=t))
        return sum(self.cost.time_of(n, self.cost.bare_cost(None, n, unit=unit))
                   for n in nodes)


_ROUTED = Expert(0, "", 0)  # time_of reads only the node's kind


def stage_overhead(cost: CostModel) -> float:
    """k: seconds one more pipeline stage adds to a layer's busier stream."""
    hw = cost.hw
    compute = KERNELS[Expert] * hw.device.launch_overhead
    send = 2 * max(hw.num_devices - 1, 1) * hw.link.latency
    return max(compute, send)


def with_hardware_costs(scheduler: Scheduler, spec: ModelSpec, hw: Hardware,
                        dtype: str | None = None) -> Scheduler:
    """`scheduler`, or for an `eps` without costs of its own a copy of it whose PN is
    chosen with `RooflineStageCosts` of this model, hardware and dtype, and whose kernel
    choice is the cost model's: the roofline charges DenseGemm more launches and models no
    grouped kernel's shortfall, so under it GroupGemm always wins and the choice is off
    (`kernel_band=None`; give an EPS a band to see what the paper's would do)."""
    if not isinstance(scheduler, EPS) or scheduler.costs is not None:
        return scheduler
    chosen = copy.copy(scheduler)
    chosen.costs = RooflineStageCosts.of(spec, hw, dtype)
    chosen.kernel_band = None
    return chosen
