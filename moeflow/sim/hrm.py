"""HRM: MoE-Lightning's hierarchical roofline model and its policy search (arXiv 2411.11217,
§4, Eqs. 4–12), the planner for the `cgopipe` scheduler.

A roof is attainable FLOP/s. An op on the GPU whose data partly lives on the CPU meets three:
P = min(P_peak_gpu, B_gpu I_gpu, B_cpu->gpu I_cpu), I_x being its FLOPs per byte read at
level x. One layer's decode step, for N requests in n_ub micro-batches of μ, takes

    T = max(T_cpu->gpu, T_cpu, T_gpu)
    T_cpu->gpu = [F_g (1 - r_w) W_ffn + A_g (1 - r_c) N c kv + x N D b] / B_cpu->gpu
    T_gpu, T_cpu = the sums of their phases' max(FLOPs / P_peak, bytes / B)
    throughput = N n / (T (n - 1) L)      tokens/s, as the artifact: n tokens, n - 1 steps

c = s + n/2 is the mean context over the decode steps, kv one token's KV bytes in a layer,
W_ffn a layer's FFN weights, D b a hidden row's bytes, x the times per layer the hidden
state returns to the GPU. Phases: projections (QKV, O, router; on the GPU, weights read per
micro-batch), attention (GPU if A_g, else CPU), MoE FFN (GPU if F_g, reading per micro-batch
the min(E, μ k) experts its rows can hit; else CPU, once for the batch). The policy is
(N, μ, A_g, F_g, r_w, r_c); peak memory stays within 0.86 of the GPU's and 0.8 of the host's
(the artifact's fractions; their headroom covers what the memory model leaves out: CUDA
context, embeddings, LM head, allocator slack).

Taken from the authors' artifact (github.com/caoshiyi/artifacts, branch asplos25,
fastmoe/backend/optimizer.py, utils.py: the memory model term by term, the 0.86/0.8 caps,
the throughput form, the T4/L4 figures). Where this model differs from it:
- its GPU time is the MoE FFN alone; here the projections are charged too;
- its attention FLOPs count Q.K only; here Q.K and P.V (CPU attention is bandwidth-bound);
- its CPU attention reads s + n tokens (the last step's); here the mean, s + n/2;
- its link carries weights (and KV for GPU attention); here also the hidden states coming
  back to the GPU (N D b per crossing; about 1 % of T on Mixtral-8x7B);
- its FFN reads all E experts per micro-batch; here min(E, μ k) (equal once μ k >= E);
- it searches A_g = 0, F_g = 1 only, μ in 1..4, 36, 68, ... and n_ub until the throughput
  first drops; here all four placements and, for each, a MILP over μ and n_ub (N = μ n_ub
  made linear through the bits of n_ub), its ratio T / N minimised by Dinkelbach's method:
  the optimum over all integers, not a local one.
F_g is the paper's boolean "FFN on the GPU"; r_w is the share of FFN weights on the GPU.

The policy search and the `moeflow plan` report are in `hrm_search.py`:

    print(plan_report("mixtral-8x7b", "t4", gen=128))
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moeflow.models.spec import ModelSpec

GIB = float(1 << 30)
TERA = 1e12
GPU_FRACTION = 0.86  # of GPU memory a policy may use (artifact: gmem * 0.86)
CPU_FRACTION = 0.8  # of host memory (artifact: cmem * 0.8)
INTER_SLACK = 1.2  # the artifact's margin on a prefill chunk's fused-MoE intermediates
MTBENCH_PROMPT = 77  # mean MTBench prompt, in tokens (artifact: --avg-prompt-len 77)
PLACEMENTS = ((False, True), (True, True), (False, False), (True, False))  # (A_g, F_g)


class HRMError(ValueError):
    pass


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise HRMError(message)


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    peak_flops: float  # FLOP/s in the model's dtype
    mem_bandwidth: float  # bytes/s
    memory: float  # bytes

    def __post_init__(self) -> None:
        _require(min(self.peak_flops, self.mem_bandwidth, self.memory) > 0,
                 f"{self.name}: FLOP/s, bandwidth and memory must be > 0")


@dataclass(frozen=True, slots=True)
class CpuSpec:
    name: str
    num_cores: int
    peak_flops: float
    mem_bandwidth: float
    memory: float

    def __post_init__(self) -> None:
        _require(self.num_cores >= 1, f"{self.name}: num_cores must be >= 1")
        _require(min(self.peak_flops, self.mem_bandwidth, self.memory) > 0,
                 f"{self.name}: FLOP/s, bandwidth and memory must be > 0")


@dataclass(frozen=True, slots=True)
class System:
    """One GPU, its host CPU, and the CPU->GPU link (bytes/s, that direction)."""

    name: str
    gpu: GpuSpec
    cpu: CpuSpec
    link_bandwidth: float
    shared_memory: bool = False  # the "GPU" is the host's CPU too (a CPU-only machine):
    # their memories are one

    def __post_init__(self) -> None:
        _require(self.link_bandwidth > 0, f"{self.name}: link bandwidth must be > 0")

    def with_host(self, num_cores: int | None = None, memory: float | None = None) -> System:
        """Another host: its FLOP/s scale with the cores; memory bandwidth, the socket's,
        which a few cores already saturate, stays."""
        cpu = self.cpu
        if num_cores is not None:
            _require(num_cores >= 1, f"cpu cores must be >= 1, got {num_cores}")
            cpu = replace(cpu, num_cores=num_cores,
                          peak_flops=cpu.peak_flops * num_cores / cpu.num_cores)
        if memory is not None:
            cpu = replace(cpu, memory=memory)
        return replace(self, cpu=cpu)


# The artifact's figures (fastmoe/backend/utils.py HardwareConfig.init; GB there = GiB):
# T4 15 GiB, 300 GiB/s, 65 TFLOP/s; L4 24 GiB, 285 GiB/s, 104 TFLOP/s; link 16 GiB/s; host
# 0.8 TFLOP/s (T4's), 1.6 (L4's). Host memory bandwidth is a launch flag: 76 GiB/s in the
# README's L4 (S2) run; 100 in benchmarks/mtbench/launch_server.sh, used here for the T4
# (S1) host. Hosts: 48 vCPUs and 192 GB (README); the artifact itself reads the memory
# free at start-up (psutil), e.g. 184.3 GiB in the README's S2 run.
PRESETS: dict[str, System] = {
    "t4": System("t4", GpuSpec("T4", 65 * TERA, 300 * GIB, 15 * GIB),
                 CpuSpec("GCP host", 48, 0.8 * TERA, 100 * GIB, 192 * GIB), 16 * GIB),
    "l4": System("l4", GpuSpec("L4", 104 * TERA, 285 * GIB, 24 * GIB),
                 CpuSpec("GCP g2-standard-48", 48, 1.6 * TERA, 76 * GIB, 192 * GIB), 16 * GIB),
}


@dataclass(frozen=True, slots=True)
class Workload:
    prompt_len: int  # s, mean prompt tokens
    gen_len: int  # n, tokens generated per request

    def __post_init__(self) -> None:
        _require(self.prompt_len >= 1, f"prompt_len must be >= 1, got {self.prompt_len}")
        _require(self.gen_len >= 2, "gen_len must be >= 2: throughput counts its n - 1 "
                                    f"decode steps; got {self.gen_len}")


@dataclass(frozen=True, slots=True)
class Policy:
    """N = batch_size requests in n_ub = N / μ micro-batches of μ = micro_batch_size;
    attention (A_g) and FFN (F_g) on the GPU or the CPU; r_w = weights_gpu of the FFN
    weights and r_c = cache_gpu of the KV cache resident on the GPU."""

    batch_size: int
    micro_batch_size: int
    attention_on_gpu: bool = False
    ffn_on_gpu: bool = True
    weights_gpu: float = 0.0
    cache_gpu: float = 0.0

    def __post_init__(self) -> None:
        n, mu = self.batch_size, self.micro_batch_size
        _require(mu >= 1 and n >= mu and n % mu == 0,
                 f"batch_size={n} must be a positive multiple of micro_batch_size={mu}")
        _require(0.0 <= self.weights_gpu <= 1.0, f"r_w={self.weights_gpu} must be in [0, 1]")
        _require(0.0 <= self.cache_gpu <= 1.0, f"r_c={self.cache_gpu} must be in [0, 1]")
        _require(self.ffn_on_gpu or self.weights_gpu == 0.0,
                 "r_w > 0 needs the FFN on the GPU (F_g): weights there serve only it")
        _require(self.attention_on_gpu or self.cache_gpu == 0.0,
                 "r_c > 0 needs attention on the GPU (A_g): KV there serves only it")

    @property
    def num_micro_batches(self) -> int:
        return self.batch_size // self.micro_batch_size


@dataclass(frozen=True, slots=True)
class _Terms:
    """A placement's unit costs per layer, shared by `estimate` and the MILP so that the
    two cannot disagree. _tok: per request; _mu: per request of a micro-batch (or prefill
    chunk); _ub: per micro-batch."""

    num_layers: int
    gen_len: int
    proj_flops_tok: float
    proj_bytes_ub: float
    attn_flops_tok: float
    attn_bytes_tok: float
    ffn_flops_tok: float
    ffn_fixed_bytes: float  # shared experts and dense MLPs: read whatever the routing
    expert_bytes: float  # one routed expert (times the share of MoE layers)
    num_experts: int
    top_k: int
    ffn_weight_bytes: float  # W_ffn
    link_kv_tok: float  # KV read at the mean context
    link_act_tok: float  # hidden rows crossing back to the GPU
    gpu_const: float  # memory from here on: all layers' non-FFN weights
    ffn_total: float  # all layers' FFN weights
    inter_mu: float  # fused-MoE intermediates of a prefill chunk
    kv_tok: float  # a request's whole KV cache, at s + n tokens
    kv_prompt_tok: float  # at s tokens
    kv_buf_mu: float  # GPU attention: double buffer of a micro-batch's streamed KV
    decode_act_tok: float  # hidden + residual during decode
    prefill_act_mu: float  # a prefill chunk's hidden, residual and KV double buffer
    prompt_tok: float  # a prompt's hidden states: the residual stays on the GPU, the
    # hidden goes to the host (the artifact's accounting)


def _terms(model: ModelSpec, workload: Workload, ag: bool, fg: bool) -> _Terms:
    b, d, a, moe = model.dtype_bytes, model.hidden_size, model.attention, model.moe
    s, n, num_layers = workload.prompt_len, workload.gen_len, model.num_layers
    frac_moe = len(model.moe_layers) / num_layers
    other = model.attention_params() + frac_moe * moe.num_experts * d  # + router
    fixed = frac_moe * model.shared_params() + (1 - frac_moe) * model.dense_params()
    ffn = fixed + frac_moe * moe.num_experts * model.expert_params()
    kv, ctx = a.cache_width * b, s + n / 2
    v_dim = a.v_head_dim if a.kind == "mla" else a.head_dim
    return _Terms(
        num_layers=num_layers, gen_len=n, proj_flops_tok=2 * other, proj_bytes_ub=other * b,
        # Q.K and P.V per cached token, and the softmax; reads q and the cache, writes o
        attn_flops_tok=ctx * a.num_heads * (2 * (a.head_dim + v_dim) + 2),
        attn_bytes_tok=ctx * kv + (a.q_width + a.o_width) * b,
        ffn_flops_tok=2 * (fixed + frac_moe * moe.top_k * model.expert_params()),
        ffn_fixed_bytes=fixed * b, expert_bytes=frac_moe * model.expert_params() * b,
        num_experts=moe.num_experts, top_k=moe.top_k, ffn_weight_bytes=ffn * b,
        link_kv_tok=ctx * kv, link_act_tok=((not ag) + (not fg)) * d * b,
        gpu_const=num_layers * other * b, ffn_total=num_layers * ffn * b,
        inter_mu=INTER_SLACK * s * moe.top_k * (d + 3 * moe.intermediate_size) * b,
        kv_tok=(s + n) * kv * num_layers, kv_prompt_tok=s * kv * num_layers,
        kv_buf_mu=2 * (s + n) * kv, decode_act_tok=2 * d * b,
        prefill_act_mu=2 * s * d * b + 2 * s * kv, prompt_tok=s * d * b)


def _memory(t: _Terms, p: Policy) -> tuple[float, float]:
    """Peak GPU bytes (the larger of decode and prefill) and host bytes. The MILP's memory
    rows are these sums, term by term."""
    num, mu, rw, ag = p.batch_size, p.micro_batch_size, p.weights_gpu, p.attention_on_gpu
    cg = p.cache_gpu * num if ag else 0.0
    common = t.gpu_const + rw * t.ffn_total + 2 * (1 - rw) * t.ffn_weight_bytes + mu * t.inter_mu
    decode = cg * t.kv_tok + ag * mu * t.kv_buf_mu + num * t.decode_act_tok
    prefill = cg * t.kv_prompt_tok + mu * t.prefill_act_mu + num * t.prompt_tok
    host = (1 - rw) * (t.ffn_total + 2 * t.ffn_weight_bytes) + (num - cg) * t.kv_tok \
        + num * t.prompt_tok
    return common + max(decode, prefill), host


@dataclass(frozen=True, slots=True)
class Phase:
    """A phase of one layer's decode step over the whole batch, and the roof that binds it:
    the largest of its compute, memory and (its own bytes over) link times."""

    name: str
    device: str  # "gpu", "cpu" or "link"
    flops: float
    bytes: float  # read from its device's memory
    link_bytes: float  # of those, brought over the CPU->GPU link this step
    time: float  # on its device: max(flops / peak, bytes / bandwidth)
    link_time: float  # of its link bytes alone
    roof: str

    @property
    def attainable_flops(self) -> float:
        """P = min(P_peak, B I, B_link I_link), FLOP/s."""
        return self.flops / max(self.time, self.link_time) if self.flops else 0.0


@dataclass(frozen=True, slots=True)
class Estimate:
    policy: Policy
    throughput: float  # tokens/s
    layer_time: float  # T: seconds per layer and decode step
    link_time: float
    cpu_time: float
    gpu_time: float
    bound: str  # which of "CPU->GPU link", "CPU", "GPU" sets T
    phases: tuple[Phase, ...]
    gpu_bytes: float  # peak
    cpu_bytes: float
    gpu_budget: float
    cpu_budget: float

    @property
    def fits(self) -> bool:
        # 1e-6: far above the solver's tolerances (its rows are of unit size), far below a byte
        return self.gpu_bytes <= self.gpu_budget * (1 + 1e-6) \
            and self.cpu_bytes <= self.cpu_budget * (1 + 1e-6)

    @property
    def roofs(self) -> dict[str, str]:
        return {ph.name: ph.roof for ph in self.phases}


def roof(flops: float, nbytes: float, peak: float, bandwidth: float, device: str,
         link_bytes: float = 0.0, link_bandwidth: float = float("inf")) -> tuple[float, str]:
    """(seconds, binding roof) of an op: the largest of flops / peak, bytes / bandwidth and
    link_bytes / link_bandwidth, i.e. flops / min(P_peak, B I, B_link I_link)."""
    times = {f"{device} compute": flops / peak, f"{device} memory": nbytes / bandwidth,
             "CPU->GPU link": link_bytes / link_bandwidth}
    name = max(times, key=lambda k: times[k])
    return times[name], name


def attainable(peak: float, bandwidth: float, intensity: float, link_bandwidth: float,
               link_intensity: float) -> float:
    """HRM's attainable FLOP/s: min(P_peak, B I, B_cpu->gpu I_cpu)."""
    return min(peak, bandwidth * intensity, link_bandwidth * link_intensity)


def estimate(model: ModelSpec, system: System, workload: Workload, policy: Policy,
             gpu_fraction: float = GPU_FRACTION, cpu_fraction: float = CPU_FRACTION) -> Estimate:
    """`policy`'s per-layer decode time by phase, throughput and peak memory."""
    p = policy
    t = _terms(model, workload, p.attention_on_gpu, p.ffn_on_gpu)
    num, nub = p.batch_size, p.num_micro_batches
    gpu, cpu, bl = system.gpu, system.cpu, system.link_bandwidth
    w_link = (1 - p.weights_gpu) * t.ffn_weight_bytes if p.ffn_on_gpu else 0.0
    kv_link = (1 - p.cache_gpu) * num * t.link_kv_tok if p.attention_on_gpu else 0.0
    act = num * t.link_act_tok

    def phase(name: str, on_gpu: bool, flops: float, nbytes: float, link: float) -> Phase:
        dev, label = (gpu, "GPU") if on_gpu else (cpu, "CPU")
        sec, _ = roof(flops, nbytes, dev.peak_flops, dev.mem_bandwidth, label)
        _, bind = roof(flops, nbytes, dev.peak_flops, dev.mem_bandwidth, label, link, bl)
        return Phase(name, label.lower(), flops, nbytes, link, sec, link / bl, bind)

    rows, groups = (p.micro_batch_size, nub) if p.ffn_on_gpu else (num, 1)
    phases = (
        phase("projections (QKV, O, router)", True, num * t.proj_flops_tok,
              nub * t.proj_bytes_ub, 0.0),
        phase("attention", p.attention_on_gpu, num * t.attn_flops_tok, num * t.attn_bytes_tok,
              kv_link),
        phase("MoE FFN", p.ffn_on_gpu, num * t.ffn_flops_tok,
              groups * (t.ffn_fixed_bytes + t.expert_bytes * min(t.num_experts, t.top_k * rows)),
              w_link),
        Phase("hidden states to GPU", "link", 0.0, act, act, act / bl, act / bl, "CPU->GPU link"),
    )
    times = {"CPU->GPU link": (w_link + kv_link + act) / bl,
             "CPU": sum(ph.time for ph in phases if ph.device == "cpu"),
             "GPU": sum(ph.time for ph in phases if ph.device == "gpu")}
    bound = max(times, key=lambda k: times[k])
    layer = times[bound]
    gpu_bytes, cpu_bytes = _memory(t, p)
    return Estimate(p, num * t.gen_len / (layer * (t.gen_len - 1) * t.num_layers), layer,
                    times["CPU->GPU link"], times["CPU"], times["GPU"], bound, phases,
                    gpu_bytes, cpu_bytes, gpu_fraction * gpu.memory, cpu_fraction * cpu.memory)


def check_fits(est: Estimate) -> Estimate:
    """`est`, or HRMError saying which memory overflows and by how much."""
    if not est.fits:
        p = est.policy
        raise HRMError(
            f"policy N={p.batch_size} μ={p.micro_batch_size} r_w={p.weights_gpu:.3f} "
            f"r_c={p.cache_gpu:.3f} does not fit: the GPU needs {est.gpu_bytes / GIB:.2f} GiB "
            f"of {est.gpu_budget / GIB:.2f} GiB allowed, the host {est.cpu_bytes / GIB:.2f} "
            f"GiB of {est.cpu_budget / GIB:.2f} GiB")
    return est
