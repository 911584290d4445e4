"""EPS-MoE prefill throughput against batch-ep, simulated side by side in one run.

Each setting runs the same prefill-heavy workload through the simulator (`moeflow.sim`, the
roofline cost model with the hardware preset's figures) under `batch-ep` (no pipelining)
and under `eps` with PN and M (micro-batches) chosen from `RooflineStageCosts` of that
model, hardware and dtype (as `moeflow simulate --scheduler eps` does). The workload: a
burst of 4096-token prompts, 1 output token each, prefilled in steps of `max_batch_tokens`
tokens (4096 per GPU; eps takes them in halves, two per GPU, `EPS.chunk_limit`); routing
uniform. Prefill throughput = prompt tokens / makespan. Column `M = 1` is eps with the
expert stages alone (no micro-batches), the paper's pipeline.

    DeepSeek-V2   h800x8  fp8        paper +21.8 % (100K -> 121.8K tok/s); our goal >= +25 %
    Mixtral-8x7B  h800x4  bfloat16   paper +32.2 %
    DBRX          h800x4  fp8        paper +52.4 % (bf16 does not fit 4×80 GB)
    PN sweep on DeepSeek-V2 (eps with `stages` fixed): 1, 2, 5, 20 where they divide the
    20 experts of each owner (all do on 8 GPUs; a PN that does not divide is skipped and
    said so)

Besides the PN eps chooses, each setting also runs eps at the paper's PN (fixed), and eps
with the paper's GroupGemm/DenseGemm band (128 and 256 rows per expert): the kernel its
`on_routing` chose per layer, and the gain then. The cost model charges DenseGemm its
extra launches and models no grouped kernel's shortfall at large loads (moeflow.sim.cost),
so there the choice only costs, and the main eps figures run without it (as `moeflow
simulate` does).

Requests: 64 prompts per setting (16 with --quick), so every run holds 8 (2) full steps
on 8 GPUs, 16 (4) on 4; the whole run takes about 15 s on a 2-core machine (about 5 s
--quick), well under the 3 minutes allowed.
The simulation is deterministic: one run per setting is its median.

`--real` also runs it for real: `make demo`'s checkpoint on two CPU actor processes
(`--transport zmq`), 16 prompts of 512 random token ids, 1 output token, prefilled in units
of up to 2048 tokens, batch-ep against eps (PN from its CPU defaults, and PN 2 fixed),
alternating, 3 rounds; prompt tokens per wall second of the whole run, medians. Then one
more round of each policy with a trace of the real run written (`--trace-dir`, default a
temporary directory): how long transfers were in flight (from their start until their
receiver took them in) and how much of that while their sender computed
(`moeflow.actors.tracing.send_overlap`), and the trace files to open.

    python benchmarks/eps.py [--quick] [--real [--trace-dir DIR]] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from moeflow.dataflow.graph import SeqChunk, Unit
from moeflow.scheduler.base import Scheduler
from moeflow.scheduler.batch_ep import BatchEP
from moeflow.scheduler.eps import EPS
from moeflow.sim import hardware, models
from moeflow.sim.eps_costs import RooflineStageCosts
from moeflow.sim.simulator import Simulator
from moeflow.sim.workload import Routing, SimRequest

PROMPT = 4096
TOKENS_PER_GPU = 4096


@dataclass(frozen=True)
class Setting:
    model: str
    hardware: str
    dtype: str | None
    paper_gain: float | None  # the paper's prefill throughput gain, eps over no pipelining
    paper_pn: int  # the PN the paper used
    note: str = ""


SETTINGS = (
    Setting("deepseek-v2", "h800x8", "fp8", 0.218, 5,
            "paper 100K -> 121.8K tok/s; goal >= +25 %"),
    Setting("mixtral-8x7b", "h800x4", None, 0.322, 2),
    # 132B parameters: 66 GB of bf16 experts per GPU leave no room on 4×80 GB
    Setting("dbrx", "h800x4", "fp8", 0.524, 2, "fp8: bf16 does not fit 4×80 GB"),
)
SWEEP = (1, 2, 5, 20)


def prefill_throughput(setting: Setting, scheduler: Scheduler, num_requests: int
                       ) -> float:
    return simulate(setting, scheduler, num_requests)[0]


def kernels_by_layer(kernels: dict[int, dict[str, int]]) -> dict[str, Any]:
    """What `on_routing` chose, per layer: the layers whose routed groups all ran grouped,
    all dense, or some of each, and the groups run on each kernel."""
    out: dict[str, Any] = {"grouped_layers": 0, "dense_layers": 0, "mixed_layers": 0,
                           "groups": {}}
    for chosen in kernels.values():
        kind = "mixed" if len(chosen) > 1 else next(iter(chosen))
        out[f"{kind}_layers"] += 1
        for kernel, n in chosen.items():
            out["groups"][kernel] = out["groups"].get(kernel, 0) + n
    return out


def simulate(setting: Setting, scheduler: Scheduler, num_requests: int
             ) -> tuple[float, dict[str, Any]]:
    """Prefill tok/s, and the kernel choice per layer as the scheduler's on_routing made
    it."""
    spec = models.load(setting.model)
    hw = hardware.load(setting.hardware)
    routing = Routing.parse("uniform", spec.moe.num_experts, spec.moe.top_k, spec.num_layers,
                            seed=0)
    reqs = [SimRequest(0.0, PROMPT, 1) for _ in range(num_requests)]
    sim = Simulator(spec, hw, scheduler, routing, dtype=setting.dtype,
                    max_batch_tokens=TOKENS_PER_GPU * hw.num_devices, max_seqs=256)
    result = sim.run(reqs, record=False)
    return num_requests * PROMPT / result.metrics.makespan, kernels_by_layer(result.kernels)


def choice_of(setting: Setting, eps: EPS) -> Any:
    """The StageChoice eps makes for one full prefill step of this setting, as eps forms
    it (`EPS.chunk_limit`: each GPU two halves of prompts)."""
    spec = models.load(setting.model)
    hw = hardware.load(setting.hardware)
    devices = hw.device_names()
    from moeflow.scheduler.base import Cluster

    cluster = Cluster.sharded(devices, spec.moe.num_experts)
    half = TOKENS_PER_GPU // 2
    unit = Unit(tuple(SeqChunk(2 * i + j, 0, half, d) for i, d in enumerate(devices)
                      for j in range(2)))
    return eps.choice(unit, spec, cluster)


def run(quick: bool) -> dict[str, Any]:
    num_requests = 16 if quick else 64
    rows: list[dict[str, Any]] = []
    for s in SETTINGS:
        costs = RooflineStageCosts.of(models.load(s.model), hardware.load(s.hardware), s.dtype)
        # the kernel choice as the cost model would make it: grouped always (see
        # moeflow.sim.eps_costs.with_hardware_costs)
        eps = EPS(costs=costs, kernel_band=None)
        base = prefill_throughput(s, BatchEP(), num_requests)
        ours = prefill_throughput(s, eps, num_requests)
        staged = prefill_throughput(s, EPS(costs=costs, kernel_band=None, micro_batches=1),
                                    num_requests)
        # and with the paper's band, as a GPU run of eps would choose
        banded, kernels = simulate(s, EPS(costs=costs), num_requests)
        choice = choice_of(s, eps)
        at_paper_pn = prefill_throughput(s, EPS(stages=s.paper_pn, kernel_band=None),
                                         num_requests)
        rows.append({"setting": f"{s.model} {s.hardware} {s.dtype or 'bf16'}",
                     "batch_ep_tok_s": base, "eps_tok_s": ours, "gain": ours / base - 1,
                     "paper_gain": s.paper_gain, "pn": choice.stages, "reason": choice.reason,
                     "micro_batches": choice.micro_batches, "gain_stages_only": staged / base - 1,
                     "paper_pn": s.paper_pn, "gain_at_paper_pn": at_paper_pn / base - 1,
                     "pn_target": choice.target, "comm_s": choice.comm_s,
                     "gemm_s": choice.gemm_s, "k_s": costs.stage_overhead_s, "note": s.note,
                     "kernels": kernels, "gain_with_paper_band": banded / base - 1})
    sweep: list[dict[str, Any]] = []
    ds = SETTINGS[0]
    spec = models.load(ds.model)
    per_owner = spec.moe.num_experts // hardware.load(ds.hardware).num_devices
    base = None
    for pn in SWEEP:
        if per_owner % pn:
            sweep.append({"pn": pn, "skipped": f"does not divide {per_owner} experts/owner"})
            continue
        tput = prefill_throughput(ds, EPS(stages=pn, kernel_band=None), num_requests)
        base = base if base is not None else rows[0]["batch_ep_tok_s"]
        sweep.append({"pn": pn, "eps_tok_s": tput, "gain": tput / base - 1})
    return {"num_requests": num_requests, "prompt_tokens": PROMPT,
            "tokens_per_gpu_per_step": TOKENS_PER_GPU, "settings": rows, "sweep": sweep}


def table(result: dict[str, Any]) -> str:
    lines = [f"prefill: {result['num_requests']} prompts of {result['prompt_tokens']} tokens, "
             f"1 output token, {result['tokens_per_gpu_per_step']} tokens/GPU per step "
             f"(simulated)",
             f"{'setting':28} {'batch-ep tok/s':>14} {'eps tok/s':>12} {'ours':>8} "
             f"{'paper':>8}  PN  M  {'M = 1':>7}  {'at paper PN':>14}  (PN*, reason)"]
    for r in result["settings"]:
        paper = f"{r['paper_gain']:+.1%}" if r["paper_gain"] is not None else "-"
        lines.append(f"{r['setting']:28} {r['batch_ep_tok_s']:>14,.0f} {r['eps_tok_s']:>12,.0f} "
                     f"{r['gain']:>+8.1%} {paper:>8}  {r['pn']:>2} {r['micro_batches']:>2}  "
                     f"{r['gain_stages_only']:>+7.1%}  "
                     f"{r['gain_at_paper_pn']:>+8.1%} (PN {r['paper_pn']})  ({r['pn_target']:.2f}, "
                     f"{r['reason']}; T_comm {r['comm_s'] * 1e6:.0f} us, T_comp "
                     f"{r['gemm_s'] * 1e6:.0f} us, k {r['k_s'] * 1e6:.0f} us)")
        k = r["kernels"]
        lines.append(f"{'':28} with the paper's kernel band, on_routing chose: "
                     f"{k['grouped_layers']} layers grouped, {k['dense_layers']} dense, "
                     f"{k['mixed_layers']} mixed ("
                     + ", ".join(f"{n:,} {name}" for name, n in sorted(k["groups"].items()))
                     + f" expert groups): {r['gain_with_paper_band']:+.1%}")
    lines.append(f"PN sweep, {result['settings'][0]['setting']} (eps with PN fixed, against "
                 f"batch-ep; the paper chose PN = 5):")
    for r in result["sweep"]:
        if "skipped" in r:
            lines.append(f"  PN {r['pn']:>2}: skipped ({r['skipped']})")
        else:
            lines.append(f"  PN {r['pn']:>2}: {r['eps_tok_s']:>12,.0f} tok/s  {r['gain']:+.1%}")
    return "\n".join(lines)


REAL_PROMPTS, REAL_PROMPT_LEN, REAL_ROUNDS = 16, 512, 3


def run_real(trace_dir: str | None = None) -> list[dict[str, Any]]:
    """Prefill on two actor processes, batch-ep against eps, alternating, then a traced
    round of each (see above)."""
    import random
    import statistics
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from engine import DEVICES, demo_checkpoint

    from moeflow.actors.coordinator import ZmqExecutor
    from moeflow.actors.tracing import RealTrace, send_overlap
    from moeflow.models.families import load_spec
    from moeflow.ops.sampling import SamplingParams
    from moeflow.scheduler.base import Cluster
    from moeflow.serve.engine import EngineCore

    checkpoint = demo_checkpoint()
    spec = load_spec(checkpoint)
    cluster = Cluster.sharded(DEVICES, spec.moe.num_experts)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, spec.vocab_size) for _ in range(REAL_PROMPT_LEN)]
               for _ in range(REAL_PROMPTS)]
    policies: dict[str, Scheduler] = {"batch-ep": BatchEP(), "eps": EPS(),
                                      "eps, PN 2": EPS(stages=2),
                                      "eps, M 2": EPS(micro_batches=2)}
    seconds: dict[str, list[float]] = {name: [] for name in policies}
    stages: dict[str, tuple[int, int]] = {}  # PN, M of its last unit
    traces: dict[str, str] = {}
    out_dir = trace_dir or tempfile.mkdtemp(prefix="moeflow-eps-traces-")
    os.makedirs(out_dir, exist_ok=True)

    def prefill(executor: ZmqExecutor, name: str, policy: Scheduler) -> float:
        core = EngineCore(spec, executor, policy, cluster, max_batch_tokens=2048)
        params = SamplingParams(max_new_tokens=1, ignore_eos=True)
        start = time.perf_counter()
        for prompt in prompts:
            core.add_request(prompt, params)
        while core.has_unfinished():
            for job in core.schedule():
                if isinstance(policy, EPS):
                    chosen = policy.choice(job.unit, spec, cluster)
                    stages[name] = (chosen.stages, chosen.micro_batches)
                [result] = executor.run_many([core.job_spec(job)])
                core.complete(job, result)
        for rid in list(core.requests):
            core.pop_finished(rid)
        return time.perf_counter() - start

    with ZmqExecutor(str(checkpoint), cluster.placement, "bfloat16", 65536) as executor:
        for _ in range(REAL_ROUNDS):
            for name, policy in policies.items():
                seconds[name].append(prefill(executor, name, policy))
        for name, policy in policies.items():  # traced apart: tracing is not free
            path = os.path.join(out_dir, name.replace(", ", "-").replace(" ", "") + ".json")
            executor.coordinator.trace = RealTrace(path, f"{name}: prefill on 2 actors")
            try:
                prefill(executor, name, policy)
            finally:
                executor.coordinator.close_trace()
            traces[name] = path
    tokens = REAL_PROMPTS * REAL_PROMPT_LEN
    base = statistics.median(seconds["batch-ep"])
    rows = []
    for name, runs in seconds.items():
        lanes = send_overlap(traces[name])
        send = sum(a["send_s"] for a in lanes.values())
        hidden = sum(a["overlap_s"] for a in lanes.values())
        pn, m = stages.get(name, (1, 1))
        rows.append({"policy": name, "pn": pn, "micro_batches": m,
                     "tok_s": tokens / statistics.median(runs),
                     "ratio": base / statistics.median(runs), "trace": traces[name],
                     "send_s": send, "send_overlapped_s": hidden,
                     "send_overlapped": hidden / send if send else 0.0})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts per setting, not 64")
    parser.add_argument("--real", action="store_true",
                        help="also prefill for real on two CPU actor processes")
    parser.add_argument("--trace-dir", help="with --real: write the real traces here")
    parser.add_argument("--json", dest="json_out", help="write the results as JSON here")
    args = parser.parse_args()
    from moeflow.cli import check_output

    check_output(parser, args.json_out, "--json")  # before minutes of measuring
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    result = run(args.quick)
    result["wall_s"] = time.perf_counter() - start
    print(table(result))
    print(f"({result['wall_s']:.1f} s wall)")
    if args.real:
        result["real"] = run_real(args.trace_dir)
        print(f"\nfor real: {REAL_PROMPTS} prompts of {REAL_PROMPT_LEN} tokens on 2 CPU actor "
              f"processes, medians of {REAL_ROUNDS} alternating rounds")
        for r in result["real"]:
            print(f"  {r['policy']:10} PN {r['pn']} M {r['micro_batches']}: "
                  f"{r['tok_s']:>8,.0f} prompt tok/s  "
                  f"{r['ratio']:.2f}x batch-ep; traced round: transfers in flight "
                  f"{r['send_s']:.2f} s, {r['send_overlapped']:.0%} of it while their sender "
                  f"computed ({r['trace']})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
