"""Hypothesis strategies for scheduler tests: small models, clusters, routings, workloads and
hardware whose memory is tight enough that budgets bind.

Everything drawn is plain frozen data with a valid-Python repr, so a shrunk counterexample
reads as a short program.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from moeflow.dataflow.graph import Placement
from moeflow.models.families import spec_from_config
from moeflow.models.spec import ModelSpec
from moeflow.models.tiny import TinyShape, tiny_config
from moeflow.sim.cost import CostModel
from moeflow.sim.hardware import GB, DeviceSpec, Hardware, LinkSpec
from moeflow.sim.simulator import activation_bytes
from moeflow.sim.workload import SimRequest

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2")


@dataclass(frozen=True, slots=True)
class ModelCase:
    """A small model, by family and shape (its repr is short; `spec` builds it)."""

    family: str
    layers: int
    experts: int
    top_k: int

    @property
    def shape(self) -> TinyShape:
        return TinyShape(layers=self.layers, experts=self.experts, top_k=self.top_k)

    @property
    def spec(self) -> ModelSpec:
        return spec_from_config(tiny_config(self.family, self.shape), f"tiny {self.family}")


@st.composite
def model_cases(draw: st.DrawFn, families: tuple[str, ...] = FAMILIES) -> ModelCase:
    experts = draw(st.sampled_from([2, 4, 8]))
    return ModelCase(draw(st.sampled_from(families)), draw(st.integers(1, 3)), experts,
                     draw(st.integers(1, min(2, experts))))


@dataclass(frozen=True, slots=True)
class ClusterCase:
    devices: tuple[str, ...]
    expert_owners: tuple[int, ...]

    @property
    def placement(self) -> Placement:
        return Placement(self.devices, self.expert_owners)


@st.composite
def cluster_cases(draw: st.DrawFn, num_experts: int, max_devices: int = 4) -> ClusterCase:
    n = draw(st.integers(1, max_devices))
    devices = tuple(f"cpu:{i}" for i in range(n))
    if draw(st.booleans()):
        owners = Placement.sharded(devices, num_experts).expert_owners
    else:
        owners = tuple(draw(st.lists(st.integers(0, n - 1), min_size=num_experts,
                                     max_size=num_experts)))
    return ClusterCase(devices, owners)


@dataclass(frozen=True, slots=True)
class WorkloadCase:
    requests: tuple[SimRequest, ...]
    max_batch_tokens: int
    max_seqs: int
    kv_blocks: int  # KV-cache blocks of 16 tokens each serving device can hold
    routing: str
    seed: int

    @property
    def all_at_zero(self) -> bool:
        return all(r.arrival == 0.0 for r in self.requests)


@st.composite
def workload_cases(draw: st.DrawFn, max_requests: int = 6,
                   routings: tuple[str, ...] = ("uniform", "zipf:s=1.5", "remote")
                   ) -> WorkloadCase:
    n = draw(st.integers(1, max_requests))
    at_zero = draw(st.booleans())
    requests = []
    t = 0.0
    for _ in range(n):
        if not at_zero:
            t += draw(st.sampled_from([0.0, 1e-4, 1e-3, 5e-3]))
        requests.append(SimRequest(t, draw(st.integers(1, 40)), draw(st.integers(1, 8))))
    longest = max(r.prompt + r.output for r in requests)
    fewest = -(-longest // 16)  # the longest request must fit on its own
    # mostly tight, so that budgets bind and preemption happens; sometimes roomy
    kv_blocks = draw(st.one_of(st.integers(fewest, fewest + 2), st.integers(fewest, 24)))
    return WorkloadCase(
        tuple(requests), draw(st.sampled_from([8, 16, 32, 64])), draw(st.integers(1, 8)),
        kv_blocks, draw(st.sampled_from(routings)), draw(st.integers(0, 3)))


def tight_hardware(spec: ModelSpec, placement: Placement, kv_blocks: int,
                   max_batch_tokens: int, max_seqs: int, headroom: float = 0.1,
                   reserved: dict[str, int] | None = None) -> Hardware:
    """A GPU-like device sized so that each serving device holds exactly `kv_blocks` KV
    blocks (of 16 tokens) beside its weights (with the parameters a policy `reserved`) and
    the activation reserve the simulator keeps for `max_batch_tokens` tokens of `max_seqs`
    sequences in flight."""
    probe = Hardware("probe", DeviceSpec("probe", "gpu", {spec.dtype: 1e12}, 1e12, 1e15),
                     len(placement.devices), LinkSpec(1e11, 2e-6), LinkSpec(1e10, 5e-6))
    cost = CostModel(spec, probe)
    held = cost.weight_bytes(placement, placement.devices)
    weights = max(held[d] + (reserved or {}).get(d, 0) * cost.wb for d in held)
    activations = activation_bytes(spec, max_batch_tokens, max_seqs, cost.b)
    need = weights + activations + (kv_blocks + 0.5) * cost.kv_bytes_per_token() * 16
    device = DeviceSpec("test-gpu", "gpu", {spec.dtype: 50e12}, 500 * GB, need / (1 - headroom),
                        launch_overhead=3e-6, gemm_half_rows=16)
    return Hardware("test", device, len(placement.devices), LinkSpec(50 * GB, 2e-6),
                    LinkSpec(16 * GB, 5e-6))
