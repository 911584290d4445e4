"""The node an offloading policy (cgopipe, flexgen) is simulated on: one GPU and its host.

    placement, homes = offload_layout(spec, hardware, scheduler, dtype, ...)
    Simulator(spec, hardware, scheduler, routing, placement=placement, homes=homes, ...)

The GPU (`cuda:0`) keeps as many routed experts resident as its memory holds beside what
it must: the dense weights (embeddings, attention, routers, shared experts, LM head), the
double buffer the policy reserves for pages of the rest (`Scheduler.reserved_weights`),
the simulator's activation reserve and, where the KV cache stays on the GPU (flexgen),
`gpu_kv_share` of what is left. The host (`cpu`) holds every other expert. Every request
is served by the GPU.
"""

from __future__ import annotations

from moeflow.dataflow.graph import Placement
from moeflow.models.spec import ModelSpec
from moeflow.scheduler.base import Cluster, Scheduler
from moeflow.sim.cost import CostModel
from moeflow.sim.hardware import HOST, Hardware, HardwareError
from moeflow.sim.simulator import activation_bytes

GPU_KV_SHARE = 0.5  # of the GPU's free memory kept for KV where the KV stays on the GPU


def check_offload_hardware(hw: Hardware, policy: str) -> None:
    """HardwareError unless `hw` is one GPU and its host, what an offloading policy runs on."""
    if hw.device.kind != "gpu" or hw.num_devices != 1:
        raise HardwareError(f"{policy} is simulated on one GPU and its host; {hw.name} has "
                            f"{hw.num_devices} {hw.device.kind} device(s): use t4, l4, "
                            f"a100-80g, h100, h800 or h200")


def offload_layout(spec: ModelSpec, hw: Hardware, scheduler: Scheduler, dtype: str | None,
                   max_batch_tokens: int, max_seqs: int, headroom: float = 0.1,
                   gpu_kv_share: float = GPU_KV_SHARE
                   ) -> tuple[Placement, tuple[str, ...]]:
    check_offload_hardware(hw, scheduler.name)
    gpu = hw.device_names()[0]
    devices = (gpu, HOST)
    cost = CostModel(spec, hw, dtype)
    num_experts = spec.moe.num_experts
    per_expert = len(spec.moe_layers) * spec.expert_params() * cost.wb  # in every layer
    budget = hw.device.memory * (1 - headroom)
    fixed = cost.weight_bytes(Placement(devices, (1,) * num_experts), (gpu,))[gpu]
    fixed += activation_bytes(spec, max_batch_tokens, max_seqs, cost.b)
    kv_on_gpu = not scheduler.kv_devices(spec, Cluster(devices, Placement(
        devices, (1,) * num_experts)))
    for r in range(num_experts, -1, -1):  # the most experts that fit, down to none
        placement = Placement(devices, (0,) * r + (1,) * (num_experts - r))
        buffer = scheduler.reserved_weights(spec, Cluster(devices, placement)).get(gpu, 0)
        free = budget - fixed - r * per_expert - buffer * cost.wb
        if free >= 0 and (not kv_on_gpu or r == 0 or
                          free >= gpu_kv_share * (budget - fixed - buffer * cost.wb)):
            break
    else:  # even with every expert on the host (the last placement tried)
        raise HardwareError(f"{spec.name or spec.family} does not fit on {hw.name} even with "
                            f"every expert on the host: its dense weights, activations and "
                            f"the double buffer take {(fixed + buffer * cost.wb) / 1e9:.1f} GB "
                            f"of {budget / 1e9:.1f} GB")
    return placement, (gpu,)
