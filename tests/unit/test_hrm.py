"""HRM (moeflow.sim.hrm): the equations on a model small enough to compute by hand, the
artifact's published L4 solution, the search against brute force and against the paper's
S1 policy, the memory constraints, and the refusals."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from functools import cache

import pytest

from moeflow.models.spec import AttentionSpec, LayerSpec, ModelSpec, MoESpec, RopeSpec
from moeflow.sim import hrm, hrm_search, models

# the search's MILP needs scipy; the equations do not
solver = pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="needs scipy")

GIB = hrm.GIB

# A model to compute by hand: D=8, 2 query heads and 1 KV head of 4, 4 experts of F=2,
# top-1, 2 layers, fp16. Per layer: projections 208 params + router 32 = 240 (480 B); an
# expert 3*8*2 = 48 params (96 B), the FFN 384 B; a token's KV 2*4*2 = 16 B.
TINY = ModelSpec(
    family="tiny", vocab_size=16, hidden_size=8,
    attention=AttentionSpec("gqa", num_heads=2, num_kv_heads=1, head_dim=4),
    rope=RopeSpec(theta=10000.0, rotary_dim=4),
    moe=MoESpec(num_experts=4, top_k=1, intermediate_size=2),
    layers=(LayerSpec("moe"), LayerSpec("moe")), dtype="float16", name="tiny")
TINY_WORK = hrm.Workload(prompt_len=6, gen_len=5)  # mean decode context 6 + 5/2 = 8.5


def tiny_system(gpu_memory: float = 1e6, cpu_memory: float = 1e6) -> hrm.System:
    return hrm.System("toy", hrm.GpuSpec("g", 1000.0, 100.0, gpu_memory),
                      hrm.CpuSpec("c", 4, 100.0, 40.0, cpu_memory), link_bandwidth=20.0)


def test_roof_and_attainable_flops():
    assert hrm.roof(100, 10, 10, 5, "GPU") == (10.0, "GPU compute")
    assert hrm.roof(10, 100, 10, 5, "CPU") == (20.0, "CPU memory")
    assert hrm.roof(10, 100, 10, 5, "GPU", link_bytes=30, link_bandwidth=1) == (
        30.0, "CPU->GPU link")
    # P = min(P_peak, B I, B_link I_link)
    assert hrm.attainable(100, 10, 2, 1, 50) == 20
    assert hrm.attainable(100, 10, 20, 1, 50) == 50
    assert hrm.attainable(100, 10, 20, 10, 50) == 100


def test_the_equations_on_a_hand_computed_model():
    est = hrm.estimate(TINY, tiny_system(), TINY_WORK, hrm.Policy(4, 2, weights_gpu=0.5))
    by = {ph.name: ph for ph in est.phases}
    proj = by["projections (QKV, O, router)"]  # 4 * 480 FLOPs, 2 micro-batches * 480 B
    assert (proj.flops, proj.bytes, proj.time, proj.roof) == (1920, 960, 9.6, "GPU memory")
    attn = by["attention"]  # per request 8.5 * 2 heads * (2*(4+4) + 2); 8.5*16 + (8+8)*2 B
    assert attn.device == "cpu" and attn.flops == pytest.approx(4 * 306)
    assert attn.bytes == pytest.approx(4 * 168)
    assert attn.time == pytest.approx(672 / 40) and attn.roof == "CPU memory"
    ffn = by["MoE FFN"]  # a micro-batch of 2 top-1 rows reads 2 experts; half streams in
    assert (ffn.flops, ffn.bytes, ffn.link_bytes) == (384, 384, 192)
    assert ffn.time == pytest.approx(3.84) and ffn.roof == "CPU->GPU link"
    assert ffn.attainable_flops == pytest.approx(384 / 9.6)
    assert est.link_time == pytest.approx((192 + 4 * 8 * 2) / 20)  # weights + hidden rows
    assert est.gpu_time == pytest.approx(9.6 + 3.84)
    assert est.cpu_time == pytest.approx(16.8) and est.bound == "CPU"
    assert est.throughput == pytest.approx(4 * 5 / (16.8 * 4 * 2))  # N n / (T (n-1) L)
    # GPU: 960 + 0.5*768 + 2*0.5*384 + 2*201.6 (prefill intermediates), plus the prefill
    # chunk's 2*384 and the residual stream 4*96; host: 0.5*(768 + 768) + 4*352 + 4*96
    assert est.gpu_bytes == pytest.approx(3283.2) and est.cpu_bytes == pytest.approx(2560)

    streamed = hrm.estimate(TINY, tiny_system(), TINY_WORK, hrm.Policy(4, 2))
    assert streamed.link_time == pytest.approx(22.4) and streamed.bound == "CPU->GPU link"
    assert streamed.throughput == pytest.approx(20 / (22.4 * 8))


@solver
def test_a_policy_that_cannot_fit_is_refused():
    policy = hrm.Policy(4, 2, weights_gpu=0.5)  # needs 3283.2 B of GPU
    roomy = hrm.estimate(TINY, tiny_system(gpu_memory=3283.2 / 0.86), TINY_WORK, policy)
    assert hrm.check_fits(roomy) is roomy
    tight = hrm.estimate(TINY, tiny_system(gpu_memory=3000), TINY_WORK, policy)
    assert not tight.fits
    with pytest.raises(hrm.HRMError, match=r"does not fit: the GPU needs 0\.00 GiB"):
        hrm.check_fits(tight)
    with pytest.raises(hrm.HRMError, match="no policy fits mixtral-8x7b .* the host needs"):
        hrm_search.search(models.load("mixtral-8x7b"), hrm.PRESETS["t4"].with_host(memory=64 * GIB),
                   hrm.Workload(77, 128))


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=10, micro_batch_size=4), "multiple of micro_batch_size"),
    (dict(batch_size=4, micro_batch_size=4, weights_gpu=1.5), r"r_w=1.5 must be in \[0, 1\]"),
    (dict(batch_size=4, micro_batch_size=4, ffn_on_gpu=False, weights_gpu=0.1), "F_g"),
    (dict(batch_size=4, micro_batch_size=4, cache_gpu=0.1), "A_g"),
])
def test_policy_validates(kwargs, match):
    with pytest.raises(hrm.HRMError, match=match):
        hrm.Policy(**kwargs)
    assert hrm.Policy(8, 4).num_micro_batches == 2


def test_the_artifacts_published_l4_solution():
    # README of caoshiyi/artifacts (asplos25), S2 (L4, 184.3 GiB free), MTBench s=77, n=32:
    # Policy(ubs=324, n_ub=14, wg=0.055884688): "gpu peak mem 20.640 GB", "cpu peak mem
    # 147.282 GB" (GiB), "decode throughput = 944.66 token/s". The memory model is the
    # artifact's; the time here is 1.4 % longer: the hidden states' trip back to the GPU.
    system = hrm.PRESETS["l4"].with_host(memory=197880360960.0)
    est = hrm.estimate(models.load("mixtral-8x7b"), system, hrm.Workload(77, 32),
                       hrm.Policy(324 * 14, 324, weights_gpu=0.055884688))
    assert est.gpu_bytes / GIB == pytest.approx(20.640, abs=0.005)
    assert est.cpu_bytes / GIB == pytest.approx(147.282, abs=0.005)
    assert 0.97 < est.throughput / 944.66 < 1.0
    assert est.bound == "CPU->GPU link"


@cache
def s1(micro_batch_size: int | None = None,
       num_micro_batches: int | None = None) -> hrm_search.SearchResult:
    return hrm_search.search(models.load("mixtral-8x7b"), hrm.PRESETS["t4"],
                      hrm.Workload(hrm.MTBENCH_PROMPT, 128),
                      micro_batch_size=micro_batch_size, num_micro_batches=num_micro_batches)


@solver
def test_s1_is_in_the_papers_ballpark():
    # The paper's S1 (Mixtral-8x7B, one T4, 192 GB host, MTBench, gen 128): the artifact's
    # README gives --ubs 164 --n-ub 14 (N = 2296), measured 97.7 tok/s end to end
    # (benchmarks/mtbench/mtbench_moel_t4.jsonl, prefill included). ±25 % on μ and N: the
    # artifact steps μ by 32 and stops n_ub at its first drop in throughput, sizes the host
    # by the memory free at start-up (under 192 GiB), and its runs vary ("you may observe
    # some variances on the generated policies"); we found μ = 142, n_ub = 18.
    found, paper = s1(), s1(micro_batch_size=164, num_micro_batches=14)
    p = found.policy
    assert (p.attention_on_gpu, p.ffn_on_gpu, p.cache_gpu) == (False, True, 0.0)
    assert 0.75 * 164 <= p.micro_batch_size <= 1.25 * 164
    assert 0.75 * 2296 <= p.batch_size <= 1.25 * 2296
    assert p.weights_gpu < 0.1  # T4: nearly all expert weights stream from the host
    # the search beats the paper's integers under this model, by less than 25 %; a decode
    # bound, the prediction is well above the measured end-to-end 97.7 tok/s
    assert paper.policy.micro_batch_size == 164 and paper.policy.num_micro_batches == 14
    assert paper.throughput <= found.throughput <= 1.25 * paper.throughput
    assert found.throughput > 2 * 97.7
    assert found.estimate.bound == "CPU->GPU link"
    assert found.estimate.roofs["MoE FFN"] == "CPU->GPU link"
    assert found.estimate.roofs["attention"] == "CPU memory"


@solver
def test_the_search_is_optimal_against_brute_force():
    """Every (μ, n_ub) of S1 with r_w at its best (the most the memory allows: the link
    time only falls with it; memory is linear in r_w), none beating the MILP's policy."""
    model, system = models.load("mixtral-8x7b"), hrm.PRESETS["t4"]
    work, found = hrm.Workload(hrm.MTBENCH_PROMPT, 128), s1()
    best = 0.0
    for mu in range(1, 301):
        for n_ub in range(1, 41):
            e0, e1 = (hrm.estimate(model, system, work, hrm.Policy(mu * n_ub, mu,
                                                                   weights_gpu=r))
                      for r in (0.0, 1.0))
            hi = (e0.gpu_budget - e0.gpu_bytes) / (e1.gpu_bytes - e0.gpu_bytes)
            lo = (e0.cpu_bytes - e0.cpu_budget) / (e0.cpu_bytes - e1.cpu_bytes)
            if min(hi, 1.0) < max(lo, 0.0):
                continue
            rw = min(hi, 1.0)
            best = max(best, hrm.estimate(model, system, work, hrm.Policy(
                mu * n_ub, mu, weights_gpu=rw)).throughput)
    assert found.throughput == pytest.approx(best, rel=1e-6)


@solver
@pytest.mark.parametrize("name, hardware, host_gib, gen", [
    ("mixtral-8x7b", "t4", None, 128),
    ("mixtral-8x7b", "l4", 120, 256),
    ("qwen3-30b-a3b", "t4", None, 64),
    ("olmoe-1b-7b", "l4", None, 32),  # fits the GPU: attention and KV move there
])
def test_the_search_respects_memory_and_its_own_estimate(name, hardware, host_gib, gen):
    model = models.load(name)
    system = hrm.PRESETS[hardware].with_host(memory=host_gib and host_gib * GIB)
    work = hrm.Workload(hrm.MTBENCH_PROMPT, gen)
    result = s1() if (name, hardware, gen) == ("mixtral-8x7b", "t4", 128) else \
        hrm_search.search(model, system, work)
    est = result.estimate
    assert est.gpu_bytes <= 0.86 * system.gpu.memory * (1 + 1e-6)
    assert est.cpu_bytes <= 0.8 * system.cpu.memory * (1 + 1e-6)
    assert est == hrm.estimate(model, system, work, result.policy)
    assert result.throughput == max(tp for _, _, tp in result.placements)
    assert result.num_solves < 100


@solver
def test_more_host_memory_never_lowers_the_throughput():
    model, work = models.load("mixtral-8x7b"), hrm.Workload(hrm.MTBENCH_PROMPT, 256)
    small = hrm_search.search(model, hrm.PRESETS["l4"].with_host(memory=120 * GIB), work,
                       placements=((False, True),))
    large = hrm_search.search(model, hrm.PRESETS["l4"], work, placements=((False, True),))
    assert small.policy.batch_size < large.policy.batch_size
    assert small.throughput < large.throughput


def test_host_cores_scale_its_flops():
    host = hrm.PRESETS["t4"].with_host(num_cores=12, memory=96e9).cpu
    assert host.peak_flops == pytest.approx(0.2e12) and host.memory == 96e9
    assert host.mem_bandwidth == hrm.PRESETS["t4"].cpu.mem_bandwidth


@solver
def test_plan_report():
    text = hrm_search.plan_report("mixtral-8x7b", "t4", gen=128, placements=((False, True),))
    assert "policy: N=2556 μ=142 n_ub=18 attention on CPU, FFN on GPU" in text
    assert "predicted decode throughput: 493.9 tok/s" in text
    assert "bound by CPU->GPU link" in text
    assert "MoE FFN" in text and "binding roof" in text
    with pytest.raises(hrm.HRMError, match="no policy fits"):
        hrm_search.plan_report("mixtral-8x7b", "t4", cpu_cores=8, cpu_memory="96GB")
    with pytest.raises(hrm.HRMError, match="HRM's own presets: l4, t4"):
        hrm_search.plan_report("mixtral-8x7b", "h99")
    # the simulator's hardware: an H100 and its server host
    assert "HRM plan: mixtral-8x7b on H100-SXM5-80GB (75 GiB) + host (112 cores" in \
        hrm_search.plan_report("mixtral-8x7b", "h100", gen=32)


def test_the_system_of_the_simulators_hardware(tmp_path):
    from moeflow.sim import hardware

    h100 = hrm_search.system_of(hardware.load("h100"))
    assert h100.gpu.memory == 80e9 and h100.gpu.peak_flops == 989.5e12
    assert h100.cpu.num_cores == 112 and h100.cpu.memory == 512e9
    assert h100.link_bandwidth == hardware.load("h100").host_link.bandwidth
    t4 = hrm_search.load_system("t4")  # HRM's own figures, not the data sheet's
    assert t4 is hrm.PRESETS["t4"]
    # a machine of CPUs alone (as `moeflow calibrate` writes it): its CPU is both
    cpu = hardware.DeviceSpec("cpu-2t", "cpu", {"bfloat16": 3e11, "float32": 1e11}, 4e10,
                              24e9, cores=2)
    path = tmp_path / "cpu.json"
    path.write_text(hardware.Hardware("here", cpu, 1, hardware.LinkSpec(8e10),
                                      hardware.LinkSpec(8e10), 24e9).to_json())
    here = hrm_search.load_system(str(path))
    assert here.gpu == hrm.GpuSpec("cpu-2t", 3e11, 4e10, 24e9)
    assert here.cpu == hrm.CpuSpec("cpu-2t", 2, 3e11, 4e10, 24e9)
    assert here.link_bandwidth == 8e10
    assert hrm_search.load_system(str(path), "float32").gpu.peak_flops == 1e11
    with pytest.raises(hrm.HRMError, match="no peak FLOP/s for float16"):
        hrm_search.load_system(str(path), "float16")
    assert here.shared_memory and not h100.shared_memory
    # the cap comes out of the one memory: the host keeps the rest (it counted it twice)
    capped = hrm_search.with_gpu_memory(here, 9e6)
    assert capped.gpu.memory * hrm.GPU_FRACTION == pytest.approx(9e6)
    assert capped.cpu == hrm.CpuSpec("cpu-2t", 2, 3e11, 4e10, 24e9 - 9e6)
    assert hrm_search.with_gpu_memory(h100, 9e6).cpu == h100.cpu  # a GPU's own memory
    with pytest.raises(hrm.HRMError, match="the whole of this machine's"):
        hrm_search.with_gpu_memory(here, 24e9)


@solver
def test_a_batch_cap_bounds_the_policy_and_a_tiny_model_solves():
    """max_batch bounds N; a model a thousand times smaller than its GPU (its μ bound in
    the millions) still gives a policy (the big-M rows once lost N within tolerances)."""
    model, work = models.load("mixtral-8x7b"), hrm.Workload(hrm.MTBENCH_PROMPT, 128)
    capped = hrm_search.search(model, hrm.PRESETS["t4"], work, max_batch=256)
    assert capped.policy.batch_size <= 256
    assert capped.throughput < s1().throughput
    assert hrm_search.search(TINY, hrm.PRESETS["t4"], TINY_WORK,
                             max_batch=64).policy.batch_size <= 64
    with pytest.raises(hrm.HRMError, match="max_batch must be >= 1"):
        hrm_search.search(model, hrm.PRESETS["t4"], work, max_batch=0)


@solver
def test_hrm_cgopipe_takes_mu_of_cgopipes_placement():
    from moeflow.scheduler.cgopipe import CGOPipe

    model, work = models.load("mixtral-8x7b"), hrm.Workload(hrm.MTBENCH_PROMPT, 128)
    scheduler, line = hrm_search.hrm_cgopipe(model, hrm.PRESETS["t4"], work, 256)
    found = hrm_search.search(model, hrm.PRESETS["t4"], work, placements=((False, True),),
                              max_batch=256).policy
    assert type(scheduler) is CGOPipe
    assert scheduler.micro_batch_size == found.micro_batch_size
    assert f"N={found.batch_size} μ={found.micro_batch_size}" in line
    assert "tok/s predicted" in line and "flexgen's placement" not in line
    # where HRM's best placement is another (attention on the GPU), the line says so
    _, toy_line = hrm_search.hrm_cgopipe(TINY, tiny_system(), TINY_WORK, 64)
    best = hrm_search.search(TINY, tiny_system(), TINY_WORK, max_batch=64)
    assert best.policy.attention_on_gpu and "with attention on the GPU, flexgen's" in toy_line
    # no policy fits: cgopipe as it comes, and why
    small = hrm.PRESETS["t4"].with_host(num_cores=8, memory=1e9)
    scheduler, line = hrm_search.hrm_cgopipe(model, small, work, 256)
    assert scheduler.micro_batch_size is None and "found no policy" in line


def test_parse_bytes():
    assert hrm_search.parse_bytes("192GB") == 192e9
    assert hrm_search.parse_bytes("180 GiB") == 180 * GIB
    assert hrm_search.parse_bytes(5e9) == 5e9
    with pytest.raises(hrm.HRMError, match="not a memory size"):
        hrm_search.parse_bytes("lots")


def test_importing_hrm_pulls_in_no_numpy_scipy_or_torch():
    code = ("import sys, moeflow.sim.hrm\n"
            "print([m for m in ('numpy', 'scipy', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_a_node_of_several_gpus_is_refused_not_planned_as_one():
    """HRM plans one GPU and its host: h100x8 would be one GPU against eight GPUs' host."""
    with pytest.raises(hrm.HRMError, match="one GPU and its host; h100x8 has 8 GPUs"):
        hrm_search.load_system("h100x8")
    assert hrm_search.load_system("h100").gpu is not None
