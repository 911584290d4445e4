"""HRM's policy search (a MILP per placement, see `hrm.py` for the model) and the report
`moeflow plan` prints.

    from moeflow.sim.hrm_search import plan_report
    print(plan_report("mixtral-8x7b", "t4", gen=128))
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from moeflow import units
from moeflow.models.spec import ModelSpec
from moeflow.sim.hardware import HOST, Hardware, HardwareError
from moeflow.sim.hrm import (
    CPU_FRACTION, Estimate, GIB, GPU_FRACTION, HRMError, MTBENCH_PROMPT, PLACEMENTS,
    PRESETS, CpuSpec, GpuSpec, Policy, System, TERA, Workload, check_fits, estimate, _memory,
    _require, _terms,
)

if TYPE_CHECKING:
    from moeflow.scheduler.cgopipe import CGOPipe

@dataclass(frozen=True, slots=True)
class SearchResult:
    estimate: Estimate  # of the best policy
    num_solves: int  # MILPs solved
    placements: tuple[tuple[bool, bool, float], ...]  # (A_g, F_g, best tok/s) of each

    @property
    def policy(self) -> Policy:
        return self.estimate.policy

    @property
    def throughput(self) -> float:
        return self.estimate.throughput


def search(model: ModelSpec, system: System, workload: Workload, *,
           placements: tuple[tuple[bool, bool], ...] = PLACEMENTS,
           micro_batch_size: int | None = None, num_micro_batches: int | None = None,
           min_micro_batches: int = 1, gpu_fraction: float = GPU_FRACTION,
           cpu_fraction: float = CPU_FRACTION, max_batch: int | None = None) -> SearchResult:
    """The fitting policy of highest HRM throughput. For each placement (A_g, F_g), a MILP
    over μ, n_ub (integers), r_w, r_c (continuous) minimises T / N by Dinkelbach's method;
    the integers found are then fixed and the rest solved again as an exact LP.
    `micro_batch_size` and `num_micro_batches` pin those integers (the artifact's --gbs
    and --num-gb); `max_batch` bounds N (an engine's cap on the requests of a batch)."""
    _require(min_micro_batches >= 1, f"min_micro_batches must be >= 1, got {min_micro_batches}")
    _require(max_batch is None or max_batch >= 1, f"max_batch must be >= 1, got {max_batch}")
    budgets = (gpu_fraction * system.gpu.memory, cpu_fraction * system.cpu.memory)
    best: Estimate | None = None
    tried, solves = [], 0
    with solver_output_discarded():
        found = [_best_of(model, system, workload, ag, fg, micro_batch_size,
                          num_micro_batches, min_micro_batches, budgets, max_batch)
                 for ag, fg in placements]
    for (ag, fg), (policy, n) in zip(placements, found):
        solves += n
        if policy is None:
            continue
        est = check_fits(estimate(model, system, workload, policy, gpu_fraction, cpu_fraction))
        tried.append((ag, fg, est.throughput))
        if best is None or est.throughput > best.throughput:
            best = est
    if best is None:
        raise HRMError(_no_fit(model, system, workload, *budgets))
    return SearchResult(best, solves, tuple(tried))


def _best_of(model: ModelSpec, system: System, workload: Workload, ag: bool, fg: bool,
             micro_batch_size: int | None, num_micro_batches: int | None,
             min_micro_batches: int, budgets: tuple[float, float], max_batch: int | None
             ) -> tuple[Policy | None, int]:
    """One placement's best policy (its integers found, then the rest solved exactly), and
    the MILPs solved."""
    policy, solves = _solve(model, system, workload, ag, fg, micro_batch_size,
                            num_micro_batches, min_micro_batches, *budgets, max_batch)
    if policy is not None and (micro_batch_size is None or num_micro_batches is None):
        policy, n = _solve(model, system, workload, ag, fg, policy.micro_batch_size,
                           policy.num_micro_batches, 1, *budgets, max_batch)
        solves += n
    return policy, solves


@contextlib.contextmanager
def solver_output_discarded() -> Iterator[None]:
    """The process's stdout (fd 1) goes to /dev/null meanwhile. HiGHS (scipy's `milp`) may
    printf a debug line in a MIP solve whatever its log options (HiGHS 1.7-1.12: "Highs
    MipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();"): it must not
    break what `moeflow plan` or `generate --json` print on stdout, and it means nothing
    to a user on stderr either. C's buffered stdout is flushed before fd 1 comes back.
    Only the solve runs inside; its errors are raised, not printed."""
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to protect
        yield
        return
    libc = _libc()
    sys.stdout.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        if libc is not None:
            libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _libc() -> Any:
    import ctypes

    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _no_fit(model: ModelSpec, system: System, workload: Workload, gpu_budget: float,
            cpu_budget: float) -> str:
    """Why nothing fits: what the GPU needs at least (one request, no FFN weights), and the
    host at least with as many FFN weights on the GPU as the rest of its room allows."""
    t = _terms(model, workload, False, True)
    need_gpu = _memory(t, Policy(1, 1))[0]
    per_rw = t.ffn_total - 2 * t.ffn_weight_bytes
    rw = min(1.0, max(0.0, (gpu_budget - need_gpu) / per_rw)) if per_rw > 0 else 0.0
    need_cpu = _memory(t, Policy(1, 1, weights_gpu=rw))[1]
    return (f"no policy fits {model.name or model.family} ({t.ffn_total / GIB:.1f} GiB of FFN "
            f"weights) on {system.name}, prompt {workload.prompt_len} + gen {workload.gen_len}: "
            f"the GPU needs >= {need_gpu / GIB:.2f} GiB (one request, FFN weights on the host) "
            f"of {gpu_budget / GIB:.2f} GiB allowed; the host needs >= {need_cpu / GIB:.2f} "
            f"GiB (r_w = {rw:.3f} of them on the GPU) of {cpu_budget / GIB:.2f} GiB allowed")


def _solve(model: ModelSpec, system: System, workload: Workload, ag: bool, fg: bool,
           mu_pin: int | None, nub_pin: int | None, min_ub: int, gpu_budget: float,
           cpu_budget: float, max_batch: int | None = None) -> tuple[Policy | None, int]:
    """The best policy of one placement, or None; and the MILPs solved.

    Variables: μ (integer); n_ub's bits z_b (binary) and w_b = μ z_b (integer, linked by
    w_b <= μ_max z_b, w_b <= μ, w_b >= μ - μ_max (1 - z_b)), so N = Σ 2^b w_b is linear;
    r_w; cg = r_c N; phase times tp, ta, tf and T in ms. Memory rows in GiB. The FFN's
    min(E, k rows) is linear on either side of k rows = E: both sides are solved."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    t = _terms(model, workload, ag, fg)
    gpu, cpu = system.gpu, system.cpu
    w2 = 2 * t.ffn_weight_bytes
    # bounds: μ from the GPU rows at r_w = 0 and N = μ; N from the host, and the GPU
    mu_max = int((gpu_budget - t.gpu_const - w2 + max(0.0, w2 - t.ffn_total)) // (
        t.inter_mu + max(ag * t.kv_buf_mu + t.decode_act_tok, t.prefill_act_mu + t.prompt_tok)))
    n_max = int(min(cpu_budget / (t.prompt_tok + (not ag) * t.kv_tok),
                    gpu_budget / t.decode_act_tok, max_batch or float("inf")))
    mu_max = min(mu_max, n_max)  # μ <= N: a smaller big-M for the w_b rows (a small
    # model's μ_max in the millions put their μ within the solver's tolerances)
    mu_lo, mu_max = mu_pin or 1, min(mu_max, mu_pin or mu_max)
    if mu_max < mu_lo or n_max < 1:
        return None, 0
    bits = (nub_pin or n_max).bit_length()
    names = ["mu", "rw", "cg", "tp", "ta", "tf", "T", *(f"z{b}" for b in range(bits)),
             *(f"w{b}" for b in range(bits))]
    ix = {name: i for i, name in enumerate(names)}
    inf, ms = float("inf"), 1e3
    rows: list[tuple[dict[str, float], float, float]] = []

    def nub(c: float) -> dict[str, float]:
        return {f"z{b}": c * 2 ** b for b in range(bits)}

    def num(c: float) -> dict[str, float]:
        return {f"w{b}": c * 2 ** b for b in range(bits)}

    def row(lb: float, ub: float, *parts: dict[str, float]) -> None:
        rows.append((_merge(parts), lb, ub))

    for b in range(bits):
        row(-inf, 0, {f"w{b}": 1, f"z{b}": -mu_max})
        row(-inf, 0, {f"w{b}": 1, "mu": -1})
        row(-mu_max, inf, {f"w{b}": 1, "mu": -1, f"z{b}": -mu_max})
    if nub_pin is None:
        row(min_ub, inf, nub(1))
    if max_batch is not None:
        row(-inf, max_batch, num(1))
    row(-inf, 0, {"cg": 1}, num(-1))
    row(0, inf, {"tp": 1}, num(-ms * t.proj_flops_tok / gpu.peak_flops))
    row(0, inf, {"tp": 1}, nub(-ms * t.proj_bytes_ub / gpu.mem_bandwidth))
    dev = gpu if ag else cpu
    row(0, inf, {"ta": 1}, num(-ms * t.attn_flops_tok / dev.peak_flops))
    row(0, inf, {"ta": 1}, num(-ms * t.attn_bytes_tok / dev.mem_bandwidth))
    dev = gpu if fg else cpu
    row(0, inf, {"tf": 1}, num(-ms * t.ffn_flops_tok / dev.peak_flops))
    per_ms = ms / system.link_bandwidth
    w_ms, kv_ms = per_ms * t.ffn_weight_bytes * fg, per_ms * t.link_kv_tok * ag
    row(w_ms, inf, {"T": 1, "rw": w_ms, "cg": kv_ms}, num(-kv_ms - per_ms * t.link_act_tok))
    row(0, inf, {"T": 1, "tp": -1, "ta": -float(ag), "tf": -float(fg)})
    row(0, inf, {"T": 1, "ta": -float(not ag), "tf": -float(not fg)})
    room = (gpu_budget - t.gpu_const - w2) / GIB
    rw_gib = (t.ffn_total - w2) / GIB
    row(-inf, room, {"rw": rw_gib, "mu": (t.inter_mu + ag * t.kv_buf_mu) / GIB,
                     "cg": t.kv_tok / GIB}, num(t.decode_act_tok / GIB))
    row(-inf, room, {"rw": rw_gib, "mu": (t.inter_mu + t.prefill_act_mu) / GIB,
                     "cg": t.kv_prompt_tok / GIB}, num(t.prompt_tok / GIB))
    row(-inf, (cpu_budget - t.ffn_total - w2) / GIB, {"rw": -(t.ffn_total + w2) / GIB,
                                                      "cg": -t.kv_tok / GIB},
        num((t.kv_tok + t.prompt_tok) / GIB))

    lower, upper = np.zeros(len(names)), np.full(len(names), inf)
    integrality = np.zeros(len(names))
    lower[ix["mu"]], upper[ix["mu"]], integrality[ix["mu"]] = mu_lo, mu_max, 1
    upper[ix["rw"]], upper[ix["cg"]] = float(fg), (inf if ag else 0.0)
    for b in range(bits):
        # w_b is an integer too: else HiGHS's integrality tolerance on z_b (1e-6) would let
        # w_b drift by μ_max 1e-6, times 2^b in N
        integrality[[ix[f"z{b}"], ix[f"w{b}"]]] = 1
        upper[ix[f"z{b}"]], upper[ix[f"w{b}"]] = 1.0, mu_max
        if nub_pin is not None:  # bits fixed: an LP over r_w, r_c and the times
            lower[ix[f"z{b}"]] = upper[ix[f"z{b}"]] = (nub_pin >> b) & 1
    n_weights = np.zeros(len(names))
    for k, v in num(1).items():
        n_weights[ix[k]] = v

    # FFN bytes: fixed + e min(E, k rows), per micro-batch on the GPU (rows = μ), once on
    # the CPU (rows = N); linear on either side of k rows = E, each side a regime:
    # (μ from, μ to, the FFN row's lower bound and expression, N's range or None)
    e_ms = ms * t.expert_bytes / dev.mem_bandwidth
    f_ms = ms * t.ffn_fixed_bytes / dev.mem_bandwidth
    few, many = t.num_experts // t.top_k, -(-t.num_experts // t.top_k)
    regimes: list[tuple[int, int, float, dict[str, float], tuple[float, float] | None]]
    if fg:
        regimes = [(mu_lo, min(mu_max, few), 0.0, _merge([nub(-f_ms), num(-e_ms * t.top_k)]),
                    None),
                   (max(mu_lo, many), mu_max, 0.0, nub(-f_ms - e_ms * t.num_experts), None)]
    else:
        regimes = [(mu_lo, mu_max, f_ms, num(-e_ms * t.top_k), (-inf, few)),
                   (mu_lo, mu_max, f_ms + e_ms * t.num_experts, {}, (many, inf))]
    best, best_ratio, solves = None, inf, 0
    for lo, hi, ffn_lb, ffn, n_range in regimes:
        if lo > hi:
            continue
        extra = [*rows, (_merge([{"tf": 1.0}, ffn]), ffn_lb, inf)]
        if n_range is not None:
            extra.append((num(1), *n_range))
        a = np.zeros((len(extra), len(names)))
        lbs, ubs = np.zeros(len(extra)), np.zeros(len(extra))
        for i, (coefs, lb, ub) in enumerate(extra):
            scale = max(abs(v) for v in coefs.values())  # unit rows: HiGHS's absolute
            for k, v in coefs.items():  # tolerances then weigh every row alike
                a[i, ix[k]] = v / scale
            lbs[i], ubs[i] = lb / scale, ub / scale
        lower[ix["mu"]], upper[ix["mu"]] = lo, hi
        x, n = _dinkelbach(milp, Bounds(lower.copy(), upper.copy()),
                           LinearConstraint(a, lbs, ubs), integrality, n_weights, ix["T"])
        solves += n
        if x is not None and x[ix["T"]] / (n_weights @ x) < best_ratio:
            best, best_ratio = x, x[ix["T"]] / (n_weights @ x)
    if best is None:
        return None, solves
    mu = int(round(best[ix["mu"]]))
    n_ub = sum(2 ** b * int(round(best[ix[f"z{b}"]])) for b in range(bits))
    rw = min(1.0, max(0.0, float(best[ix["rw"]]))) if fg else 0.0
    rc = min(1.0, max(0.0, float(best[ix["cg"]]) / (mu * n_ub))) if ag else 0.0
    return Policy(mu * n_ub, mu, ag, fg, rw, rc), solves


def _merge(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """The sum of linear expressions {variable: coefficient}."""
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _dinkelbach(milp: Any, bounds: Any, constraints: Any, integrality: Any, n_weights: Any,
                t_index: int) -> tuple[Any, int]:
    """argmin T / N: minimise T - λN, set λ to the best T / N so far, until no point beats
    λ (the minimum is then 0). λ falls strictly each round; it takes a handful."""
    lam, best, best_ratio, solves = 0.0, None, float("inf"), 0
    for _ in range(60):
        c = -lam * n_weights
        c[t_index] += 1.0
        res = milp(c, integrality=integrality, bounds=bounds, constraints=constraints,
                   options={"mip_rel_gap": 1e-9, "time_limit": 30})
        solves += 1
        if res.x is None:
            break
        n_val, t_val = float(n_weights @ res.x), float(res.x[t_index])
        if n_val < 0.5:  # N >= 1 held only within tolerances: no usable point
            break
        if t_val / n_val < best_ratio:
            best, best_ratio = res.x, t_val / n_val
        if lam > 0 and t_val - lam * n_val >= -1e-9 * t_val:
            break
        lam = best_ratio
    return best, solves


# -- `moeflow plan` ---------------------------------------------------------------------

def parse_bytes(text: str | float) -> float:
    """'192GB' (1e9 B each) or '180GiB' (2^30 B each) to bytes; a number is bytes."""
    try:
        return units.parse_bytes(text)
    except ValueError as exc:
        raise HRMError(str(exc)) from None


def load_system(name: str, dtype: str = "bfloat16") -> System:
    """`system_for` the simulator's hardware of that name or file."""
    if name in PRESETS:
        return PRESETS[name]
    from moeflow.sim.hardware import load

    try:
        hardware = load(name)
    except HardwareError as exc:
        raise HRMError(f"{exc}; HRM's own presets: {', '.join(sorted(PRESETS))}") from None
    if hardware.device.kind == "gpu" and hardware.num_devices != 1:
        # HRM plans one GPU and its host: the first of eight against the whole node's host
        # memory would be a policy no GPU of it can run
        raise HRMError(f"HRM plans one GPU and its host; {hardware.name} has "
                       f"{hardware.num_devices} GPUs: use a one-GPU preset (t4, l4, "
                       f"a100-80g, h100, h800, h200) or HRM's own ({', '.join(sorted(PRESETS))})")
    return system_for(hardware, dtype)


def system_for(hardware: Hardware, dtype: str = "bfloat16") -> System:
    """HRM's own preset for a node of one T4 or L4 (the artifact's figures), else
    `system_of` it."""
    return PRESETS.get(hardware.name) or system_of(hardware, dtype)


def system_of(hardware: Hardware, dtype: str = "bfloat16") -> System:
    """HRM's System for a machine as the simulator describes it (a preset, or a `moeflow
    calibrate` file): its first device as the GPU, its host as the CPU, over the host
    link. A machine of CPUs alone is what the engine's CPU actors make of it: its CPU
    stands for both (the first device's actor is the GPU, the last's its host), over the
    link between devices; the host's memory is the machine's."""
    device = hardware.device
    gpu_node = device.kind == "gpu"
    host = hardware.spec(HOST) if gpu_node else device
    try:
        gpu_flops, cpu_flops = device.flops_for(dtype), host.flops_for(dtype)
    except HardwareError as exc:
        raise HRMError(str(exc)) from None
    link = hardware.host_link if gpu_node else hardware.link
    return System(hardware.name,
                  GpuSpec(device.name, gpu_flops, device.mem_bandwidth, device.memory),
                  CpuSpec(host.name, max(host.cores, 1), cpu_flops, host.mem_bandwidth,
                          hardware.memory_of(HOST) if gpu_node else device.memory),
                  link.bandwidth, shared_memory=not gpu_node)


def with_gpu_memory(system: System, weights: float) -> System:
    """`system` whose GPU may hold `weights` bytes (the engine's `gpu_memory` cap): HRM
    budgets GPU_FRACTION of a GPU's memory, so the GPU is given weights / GPU_FRACTION.
    Where the two share one memory (a CPU-only machine), the host keeps what the cap
    leaves of it."""
    _require(weights > 0, f"GPU memory must be > 0, got {weights}")
    gpu = replace(system.gpu, memory=weights / GPU_FRACTION)
    if not system.shared_memory:
        return replace(system, gpu=gpu)
    _require(weights < system.cpu.memory, f"GPU memory {weights:,.0f} B is the whole of "
                                          f"this machine's {system.cpu.memory:,.0f} B")
    return replace(system, gpu=gpu, cpu=replace(system.cpu,
                                                memory=system.cpu.memory - weights))


def hrm_cgopipe(model: ModelSpec, system: System, workload: Workload, max_seqs: int
                ) -> tuple[CGOPipe, str]:
    """cgopipe with the micro-batches of HRM's policy for `workload` on `system`, among
    the policies of cgopipe's placement (attention on the CPU, the FFN on the GPU), its
    batch at most `max_seqs` (the engine's cap): μ requests each, and for a step of
    decodes alone up to μ·s of them (HRM sizes a micro-batch by a prefill chunk of μ
    prompts of s tokens), at least min(n_ub, 3) for the pipeline's sake; and a line that
    says what was chosen. Where HRM finds no policy, cgopipe as it comes (3
    micro-batches) and why."""
    from moeflow.scheduler.cgopipe import LOOKAHEAD, CGOPipe

    try:
        found = search(model, system, workload, placements=((False, True),),
                       max_batch=max_seqs)
    except HRMError as exc:
        return CGOPipe(), f"cgopipe: HRM found no policy on {system.name} ({exc}); 3 micro-batches"
    policy = found.policy
    budget = policy.micro_batch_size * workload.prompt_len
    line = (f"cgopipe: HRM's policy on {system.name} for prompts of {workload.prompt_len} "
            f"and {workload.gen_len} new tokens, at most {max_seqs} requests a batch: "
            f"N={policy.batch_size} μ={policy.micro_batch_size} r_w={policy.weights_gpu:.3f}, "
            f"{_rate(found.throughput)} tok/s predicted; micro-batches of "
            f"{policy.micro_batch_size}, a step of decodes alone in "
            f"{min(policy.num_micro_batches, LOOKAHEAD + 1)} or more of up to {budget:,} "
            f"(μ prompts' tokens)")
    try:  # the other placements (cgopipe's was searched above)
        best = search(model, system, workload, max_batch=max_seqs,
                      placements=tuple(p for p in PLACEMENTS if p != (False, True)))
    except HRMError:  # none of them fits
        best = found
    if best.policy.attention_on_gpu and best.throughput > 1.05 * found.throughput:
        line += (f" (HRM predicts {_rate(best.throughput)} tok/s with attention on the GPU, "
                 f"flexgen's placement)")
    return CGOPipe(micro_batches=policy.num_micro_batches, micro_batch_tokens=budget,
                   micro_batch_size=policy.micro_batch_size), line


def _rate(tok_s: float) -> str:
    return f"{tok_s:,.0f}" if tok_s >= 100 else f"{tok_s:.3g}"


def format_estimate(est: Estimate, model: ModelSpec, system: System, workload: Workload) -> str:
    p, gpu, cpu = est.policy, system.gpu, system.cpu
    where = {True: "GPU", False: "CPU"}
    lines = [
        f"HRM plan: {model.name or model.family} on {gpu.name} ({gpu.memory / GIB:.0f} GiB) "
        f"+ host ({cpu.num_cores} cores, {cpu.peak_flops / TERA:.2f} TFLOP/s, "
        f"{cpu.mem_bandwidth / GIB:.0f} GiB/s, {cpu.memory / GIB:.0f} GiB), "
        f"CPU->GPU {system.link_bandwidth / GIB:.0f} GiB/s",
        f"workload: prompt {workload.prompt_len} tokens, gen {workload.gen_len}",
        f"policy: N={p.batch_size} μ={p.micro_batch_size} n_ub={p.num_micro_batches} "
        f"attention on {where[p.attention_on_gpu]}, FFN on {where[p.ffn_on_gpu]}, "
        f"r_w={p.weights_gpu:.3f} r_c={p.cache_gpu:.3f}",
        f"predicted decode throughput: {est.throughput:.1f} tok/s; T = "
        f"{est.layer_time * 1e3:.2f} ms per layer, bound by {est.bound} (link "
        f"{est.link_time * 1e3:.2f}, CPU {est.cpu_time * 1e3:.2f}, "
        f"GPU {est.gpu_time * 1e3:.2f} ms)",
        f"memory: GPU {est.gpu_bytes / GIB:.2f} of {est.gpu_budget / GIB:.2f} GiB allowed, "
        f"host {est.cpu_bytes / GIB:.2f} of {est.cpu_budget / GIB:.2f} GiB",
        f"{'phase':30} {'on':4} {'ms':>8} {'TFLOP/s':>8}  binding roof",
    ]
    lines += [f"{ph.name:30} {ph.device.upper():4} {ph.time * 1e3:8.2f} "
              f"{ph.attainable_flops / TERA:8.3f}  {ph.roof}" for ph in est.phases]
    return "\n".join(lines)


def plan_report(model_name: str, hardware_name: str, cpu_cores: int | None = None,
                cpu_memory: str | float | None = None, prompt: int = MTBENCH_PROMPT,
                gen: int = 128, **search_args: Any) -> str:
    """What `moeflow plan --model M --hardware H [--cpu-cores N --cpu-memory 192GB]`
    prints: the searched policy, its predicted tok/s and each phase's binding roof."""
    from moeflow.sim import models

    model = models.load(model_name)
    system = load_system(hardware_name).with_host(
        cpu_cores, None if cpu_memory is None else parse_bytes(cpu_memory))
    workload = Workload(prompt, gen)
    result = search(model, system, workload, **search_args)
    return format_estimate(result.estimate, model, system, workload)
