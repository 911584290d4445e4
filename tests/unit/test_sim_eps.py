"""eps in the simulator: StageCosts read off the cost model, the SM partition, fp8, node
sizes, and `moeflow simulate --scheduler eps`."""

from __future__ import annotations

import dataclasses

import pytest

from moeflow.cli import main
from moeflow.dataflow.compiler import Cut, compile
from moeflow.dataflow.graph import Expert, SeqChunk, Unit
from moeflow.scheduler import EPS, Cluster, make_scheduler
from moeflow.sim import hardware, models
from moeflow.sim.cost import GEMM_SM_SHARE, CostModel, DtypeError
from moeflow.sim.eps_costs import RooflineStageCosts, stage_overhead, with_hardware_costs
from moeflow.sim.hardware import Hardware, HardwareError


def full_step(spec, hw, tokens_per_device=4096):
    """One prefill step of `tokens_per_device` tokens on every device (as benchmarks/eps.py):
    (unit, spec, cluster)."""
    devices = hw.device_names()
    unit = Unit(tuple(SeqChunk(i, 0, tokens_per_device, d) for i, d in enumerate(devices)))
    return unit, spec, Cluster.sharded(devices, spec.moe.num_experts)


def choice(model, hw_name, dtype=None, **costs_changes):
    spec, hw = models.load(model), hardware.load(hw_name)
    costs = dataclasses.replace(RooflineStageCosts.of(spec, hw, dtype), **costs_changes)
    return EPS(costs=costs).choice(*full_step(spec, hw))


# -- PN from the hardware ----------------------------------------------------------------


def test_deepseek_v2_on_8_h800_in_fp8_pipelines_in_the_papers_5_stages():
    c = choice("deepseek-v2", "h800x8", "fp8")
    assert (c.stages, c.reason) == (5, "pipelined")
    assert c.comm_s > c.gemm_s  # 200 GB/s NVLink: the all-to-all is the longer side


def test_mixtral_on_4_h800_splits_in_2_as_the_paper_but_the_sm_partition_vetoes_it():
    # T_comm is a sixth of T_comp: hiding it saves less than the GEMM loses on 116/132 SMs
    assert choice("mixtral-8x7b", "h800x4").stages == 1
    assert choice("mixtral-8x7b", "h800x4").reason == \
        "the SM partition costs more than the overlap saves"
    # without the partition the rule gives the paper's PN = 2 (2 experts per owner)
    assert choice("mixtral-8x7b", "h800x4", pipelined_gemm_share=1.0).stages == 2


def test_dbrx_on_4_h800_takes_every_expert_of_an_owner_as_a_stage():
    # PN* ~ 8.7 and each owner holds 4 experts: the largest divisor, not the paper's 2
    assert choice("dbrx", "h800x4", "fp8").stages == 4


def test_short_prefills_stay_unpipelined():
    spec, hw = models.load("deepseek-v2"), hardware.load("h800x8")
    eps = EPS(costs=RooflineStageCosts.of(spec, hw, "fp8"))
    assert eps.choice(*full_step(spec, hw, 64)).stages == 1


def test_stage_costs_follow_the_cost_model():
    spec, hw = models.load("mixtral-8x7b"), hardware.load("h800x4")
    costs = RooflineStageCosts.of(spec, hw)
    cost = CostModel(spec, hw)
    c = cost.routed_cost(4096, 2)
    expected = cost.time_of(Expert(0, "", 0), c) - c.kernels * hw.device.launch_overhead
    assert costs.gemm_s(4096, 2) == pytest.approx(expected)
    assert costs.comm_s(1000) == pytest.approx(
        2 * (3 * hw.link.latency + 1000 * spec.hidden_size * 2 / hw.link.bandwidth))
    assert costs.stage_overhead_s == stage_overhead(cost) == pytest.approx(20e-6)
    assert stage_overhead(CostModel(spec, hardware.load("h800x8"))) == pytest.approx(42e-6)
    assert costs.pipelined_gemm_share == GEMM_SM_SHARE == 116 / 132


# -- presets, dtypes and the SM partition ------------------------------------------------


@pytest.mark.parametrize("name,num", [("h800x4", 4), ("h100x2", 2), ("a100-80gx16", 16),
                                      ("h200", 1), ("h800x8", 8)])
def test_node_sizes_parse(name, num):
    hw = hardware.load(name)
    assert (hw.name, hw.num_devices, len(hw.device_names())) == (name, num, num)


@pytest.mark.parametrize("name", ["h800x0", "b200x4", "h800x"])
def test_bad_node_names_are_refused(name):
    with pytest.raises(HardwareError):
        hardware.load(name)


def test_fp8_halves_the_weights_and_keeps_bf16_activations():
    spec, hw = models.load("deepseek-v2"), hardware.load("h800x8")
    bf16, fp8 = CostModel(spec, hw), CostModel(spec, hw, "fp8")
    assert (fp8.wb, fp8.b, bf16.wb, bf16.b) == (1, 2, 2, 2)
    assert fp8.peak == 2 * bf16.peak
    placement = full_step(spec, hw)[2].placement
    homes = hw.device_names()
    assert sum(fp8.weight_bytes(placement, homes).values()) == pytest.approx(
        sum(bf16.weight_bytes(placement, homes).values()) / 2)


def test_fp8_is_refused_without_fp8_hardware(capsys):
    with pytest.raises(DtypeError, match="no fp8"):
        CostModel(models.load("mixtral-8x7b"), hardware.load("a100-80gx8"), "fp8")
    assert main(["simulate", "--model", "mixtral-8x7b", "--hardware", "a100-80gx8",
                 "--dtype", "fp8", "--num-requests", "1"]) == 2
    assert "no fp8 tensor cores" in capsys.readouterr().err


def test_the_sm_partition_slows_only_pipelined_expert_gemms_on_a_gpu():
    spec = models.load("mixtral-8x7b")
    gpu = hardware.load("h800x4")
    cpu = dataclasses.replace(gpu, device=dataclasses.replace(gpu.device, kind="cpu"))
    unit, _, cluster = full_step(spec, gpu, 8)

    def routed_flop_rate(hw: Hardware, stages: int) -> float:
        cost = CostModel(spec, hw)
        graph = compile(spec, unit, cluster.placement, Cut(expert_stages=stages))
        node = next(n for n in graph.nodes if isinstance(n, Expert) and n.kind == "routed")
        c = cost.cost(graph, node, [4096] * len(node.experts))
        return c.sm_share

    assert routed_flop_rate(gpu, 1) == 1.0
    assert routed_flop_rate(gpu, 2) == GEMM_SM_SHARE
    assert routed_flop_rate(cpu, 2) == 1.0
    cost = CostModel(spec, gpu)
    plain, capped = cost.routed_cost(8192, 2), cost.routed_cost(8192, 2, pipelined=True)
    node = Expert(0, "cuda:0", 0)
    launches = plain.kernels * gpu.device.launch_overhead
    elementwise = plain.activation_bytes / gpu.device.mem_bandwidth
    assert (cost.time_of(node, capped) - launches - elementwise) == pytest.approx(
        (cost.time_of(node, plain) - launches - elementwise) / GEMM_SM_SHARE)


# -- the command line --------------------------------------------------------------------


def test_a_model_that_fits_only_in_fp8_says_so(capsys):
    assert main(["simulate", "--model", "deepseek-v2", "--hardware", "h800x8",
                 "--num-requests", "1"]) == 2
    assert "--dtype fp8" in capsys.readouterr().err


def test_simulate_builds_eps_with_the_hardwares_costs():
    spec, hw = models.load("mixtral-8x7b"), hardware.load("h800x4")
    eps = with_hardware_costs(make_scheduler("eps"), spec, hw)
    assert isinstance(eps, EPS) and isinstance(eps.costs, RooflineStageCosts)
    batch = make_scheduler("batch-ep")
    assert with_hardware_costs(batch, spec, hw) is batch
    own = EPS(stages=2)
    assert with_hardware_costs(own, spec, hw).costs is not None and own.costs is None


def test_simulate_eps_through_the_cli(capsys):
    assert main(["simulate", "--model", "mixtral-8x7b", "--hardware", "h800x4", "--scheduler",
                 "eps", "--workload", "burst", "--num-requests", "4", "--prompt-len",
                 "fixed:1024", "--output-len", "fixed:2"]) == 0
    out = capsys.readouterr().out
    assert "mixtral-8x7b on h800x4, eps" in out and "requests            4" in out
    assert "eps: units run 2 unpipelined" in out  # a prefill step and a decode step
    # DeepSeek-V2 on 8 H800: a burst of long prompts in halves, two micro-batches a step
    assert main(["simulate", "--model", "deepseek-v2", "--hardware", "h800x8", "--dtype", "fp8",
                 "--scheduler", "eps", "--workload", "burst", "--num-requests", "16",
                 "--prompt-len", "fixed:4096", "--output-len", "fixed:1",
                 "--max-batch-tokens", "32768"]) == 0
    assert "eps: units run 2 in 2 micro-batches" in capsys.readouterr().out


def test_deepseek_v3_simulates_at_its_own_shape(capsys):
    spec = models.load("deepseek-v3")
    assert (spec.family, spec.moe.num_experts, spec.moe.router, len(spec.layers)) == (
        "deepseek_v3", 256, "noaux_tc", 61)
    assert [layer.mlp for layer in spec.layers[:4]] == ["dense"] * 3 + ["moe"]
    assert main(["simulate", "--model", "deepseek-v3", "--hardware", "h200x8", "--dtype",
                 "fp8", "--workload", "burst", "--num-requests", "2", "--prompt-len",
                 "fixed:64", "--output-len", "fixed:2"]) == 0
    assert "deepseek-v3 on h200x8" in capsys.readouterr().out


@pytest.mark.parametrize("name, layers, experts", [("gpt-oss-120b", 36, 128),
                                                   ("gpt-oss-20b", 24, 32)])
def test_gpt_oss_presets_simulate(name, layers, experts, capsys):
    spec = models.load(name)
    assert (spec.family, len(spec.layers), spec.moe.num_experts, spec.attention.sinks) == (
        "gpt_oss", layers, experts, True)
    assert [layer.sliding_window for layer in spec.layers[:2]] == [128, None]
    assert main(["simulate", "--model", name, "--hardware", "h100x8", "--workload", "burst",
                 "--num-requests", "2", "--prompt-len", "fixed:64", "--output-len",
                 "fixed:2"]) == 0
    assert f"{name} on h100x8" in capsys.readouterr().out


# -- micro-batches ---------------------------------------------------------------------------


def pairs_step(spec, hw, tokens_per_device=4096):
    """One prefill step as eps forms it for a burst: two halves of prompts on each device."""
    devices = hw.device_names()
    half = tokens_per_device // 2
    unit = Unit(tuple(SeqChunk(2 * i + j, 0, half, d) for i, d in enumerate(devices)
                      for j in range(2)))
    return unit, spec, Cluster.sharded(devices, spec.moe.num_experts)


def test_micro_batches_hide_deepseek_v2s_all_to_all_but_not_mixtrals():
    for model, hw_name, dtype, chosen in (("deepseek-v2", "h800x8", "fp8", 2),
                                          ("dbrx", "h800x4", "fp8", 2),
                                          ("mixtral-8x7b", "h800x4", None, 1)):
        spec, hw = models.load(model), hardware.load(hw_name)
        costs = RooflineStageCosts.of(spec, hw, dtype)
        c = EPS(costs=costs).choice(*pairs_step(spec, hw))
        assert c.micro_batches == chosen, (model, c)
        assert (c.reason == "micro-batched") == (chosen == 2)
        # Mixtral: its all-to-all is a sixth of its GEMMs; on 116/132 SMs every kernel
        # would lose more than hiding it saves
        rest = costs.rest_s(4096)
        assert rest > 0
        assert EPS.micro_pays(dataclasses.replace(c, stages=1), costs, rest) == (chosen == 2)


def test_the_sm_partition_slows_every_kernel_of_micro_batches_that_exchange_rows():
    spec = models.load("mixtral-8x7b")
    gpu = hardware.load("h800x4")
    unit, _, cluster = pairs_step(spec, gpu, 64)
    cost = CostModel(spec, gpu)
    for micro_batches, share in ((1, 1.0), (2, GEMM_SM_SHARE)):
        graph = compile(spec, unit, cluster.placement, Cut(micro_batches=micro_batches))
        for node in graph.nodes:
            if isinstance(node, Expert) and node.kind == "routed":
                assert cost.cost(graph, node, [64] * len(node.experts)).sm_share == share
            elif not hasattr(node, "payload"):
                assert cost.cost(graph, node).sm_share == share, node
    assert cost.exchanging(cluster.placement)
    # a GPU's micro-batches beside its host (cgopipe: copies run on copy engines) keep them
    t4 = hardware.load("t4")
    offloaded = Cluster.sharded(t4.with_host(), spec.moe.num_experts).placement
    assert not CostModel(spec, t4).exchanging(offloaded)


def test_eps_prefills_deepseek_v2_in_paired_halves_faster_than_with_stages_alone():
    from moeflow.scheduler.batch_ep import BatchEP
    from moeflow.sim.simulator import Simulator
    from moeflow.sim.workload import Routing, SimRequest

    spec, hw = models.load("deepseek-v2"), hardware.load("h800x8")
    routing = Routing.parse("uniform", spec.moe.num_experts, spec.moe.top_k, spec.num_layers,
                            seed=0)
    costs = RooflineStageCosts.of(spec, hw, "fp8")

    def run(policy):
        sim = Simulator(spec, hw, policy, routing, dtype="fp8", max_batch_tokens=8 * 4096)
        return sim.run([SimRequest(0.0, 4096, 1) for _ in range(16)])

    paired = run(EPS(costs=costs, kernel_band=None))
    first = paired.jobs[0].unit
    assert [s.num_tokens for s in first.seqs] == [2048] * 16
    assert all(len(first.seqs_on(d)) == 2 for d in hw.device_names())
    staged = run(EPS(costs=costs, kernel_band=None, micro_batches=1))
    base = run(BatchEP())
    # the same tokens, in less simulated time (a deterministic model, not a wall clock)
    assert base.metrics.makespan > staged.metrics.makespan > paired.metrics.makespan
