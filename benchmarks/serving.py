"""fine-ep against batch-ep under online load, side by side on the same workload.

For each setting the offered loads are fractions of batch-ep's capacity, measured first in
the same run (the request rate batch-ep sustains on a burst of the workload): light (0.3),
medium (0.6) and near saturation (0.9). Both policies see the same requests (same arrival
times, lengths and prompts). Reported per load: throughput (output tokens/s over the run)
and p50/p99 end-to-end latency of each policy, and the ratios fine-ep / batch-ep.

1. In simulation at paper scale: Mixtral-8x7B on 8×H100 and DeepSeek-V2 on 8×H200 (in bf16
   it does not fit 8×H100), with the same scheduler code the engine runs. For context it
   also runs batch-ep with request-level (static) batching: our reading is that gains of
   the thesis's size are over a baseline like that (its full text is not public).
2. For real: `moeflow serve --transport zmq --devices cpu:0,cpu:1` (two actor processes) on
   a small checkpoint, driven by `moeflow.serve.bench` (Poisson arrivals, streamed).
3. With --http, the serving front ends side by side instead of the policies: one batch-ep
   server started with both `--bind` (ZeroMQ) and `--http` (OpenAI-compatible, SSE), the
   same load through each, one after the other (alternating which goes first), then both
   at once (one copy of the workload each at half the rate: twin requests share the
   engine's steps and the machine's noise, so what differs is the front end). Reported
   per load: TTFT, TPOT and ITL (the gaps between a request's tokens) of each, and the
   latency HTTP/SSE adds per token over ZeroMQ in % (mean TPOT and mean ITL; our goal is
   <= 10 % on the demo checkpoint). On a shared machine the runs one after the other
   differ by tens of % from run to run either way; the runs at once do not.

    python benchmarks/serving.py [--sim] [--real] [--http] [--quick] [--json out.json]
                                 [--model DIR]   # real runs: an existing checkpoint

With none of --sim, --real and --http, --sim and --real run. --quick runs fewer requests
(what `make demo` uses).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeflow.dataflow.graph import Unit
from moeflow.progress import Progress
from moeflow.scheduler import BatchEP
from moeflow.scheduler.base import Budget, RequestView
from moeflow.sim.simulator import percentile

SCHEDULERS = ("batch-ep", "fine-ep")
STATIC = "batch-ep-static"  # simulation only, for context
LOADS = (("light", 0.3), ("medium", 0.6), ("near saturation", 0.9))
FRONT_ENDS = (("zmq", "zmq"), ("http", "openai"))  # (name here, moeflow bench backend)
REAL_CHECKPOINT = Path(".cache/serving-qwen3-moe")
STARTUP_S = 300.0


@dataclass(frozen=True)
class SimSetting:
    model: str
    hardware: str
    prompt: str
    output: str
    routing: str
    num_requests: int


SIM_SETTINGS = (  # long prompts: where a barrier-free policy should help running decodes
    SimSetting("mixtral-8x7b", "h100x8", "uniform:2048-8192", "uniform:16-128", "zipf:s=1.2",
               32),
    # 236B parameters in bf16 with attention replicated per home need more than 80 GB per
    # GPU (the simulator models no fp8 yet): DeepSeek-V2 runs on 8×H200
    SimSetting("deepseek-v2", "h200x8", "uniform:2048-8192", "uniform:16-128", "zipf:s=1.2",
               24),
)


# -- simulation --------------------------------------------------------------------


class StaticBatchEP(BatchEP):
    """batch-ep with request-level (static) batching: waiting requests join only once the
    running batch has finished, as in serving systems before iteration-level batching.
    Shown for context only."""

    name = STATIC

    def form_units(self, waiting: Sequence[RequestView], running: Sequence[RequestView],
                   budget: Budget) -> list[Unit]:
        return super().form_units(waiting if not running else [], running, budget)


def simulate(setting: SimSetting, scheduler: str, arrivals: str, seed: int = 0
             ) -> dict[str, float]:
    """One simulated run; the e2e statistics of its requests (seconds)."""
    from moeflow.sim import hardware, models
    from moeflow.scheduler.registry import make_scheduler
    from moeflow.sim.simulator import Simulator
    from moeflow.sim.workload import Lengths, Routing, requests

    spec = models.load(setting.model)
    routing = Routing.parse(setting.routing, spec.moe.num_experts, spec.moe.top_k,
                            spec.num_layers)
    reqs = requests(arrivals, setting.num_requests, Lengths.parse(setting.prompt),
                    Lengths.parse(setting.output), seed=seed)
    policy = StaticBatchEP() if scheduler == STATIC else make_scheduler(scheduler)
    result = Simulator(spec, hardware.load(setting.hardware), policy, routing).run(reqs)
    span = max(t.finish for t in result.timings) - min(t.arrival for t in result.timings)
    e2e = [t.e2e for t in result.timings]
    return {"throughput_tok_s": sum(r.output for r in reqs) / span,
            "p50_e2e_s": percentile(e2e, 50), "p99_e2e_s": percentile(e2e, 99),
            "requests": len(e2e), "requests_per_s": len(e2e) / span}


def run_sim(settings: tuple[SimSetting, ...], workers: int) -> list[dict[str, Any]]:
    """Every setting's capacity, then all (setting, load, policy) runs, `workers` at once
    (the simulator is single-threaded Python)."""
    out: list[dict[str, Any]] = []
    with ProcessPoolExecutor(workers) as pool:
        caps = {s: pool.submit(simulate, s, "batch-ep", "burst") for s in settings}
        runs = {}
        capacity = {}
        for s, fut in caps.items():
            capacity[s] = fut.result()["requests_per_s"]
            for label, frac in LOADS:
                rate = frac * capacity[s]
                for sched in (*SCHEDULERS, STATIC):
                    runs[(s, label, sched)] = pool.submit(simulate, s, sched,
                                                          f"poisson:rate={rate:.6g}")
        bar = Progress(len(runs), "simulated runs")
        done = 0
        results = {}
        for key, fut in runs.items():
            results[key] = fut.result()
            done += 1
            bar.update(done)
    for s in settings:
        for label, frac in LOADS:
            row = {"setting": f"{s.model} on {s.hardware}", "load": label,
                   "offered_req_s": frac * capacity[s], "capacity_req_s": capacity[s],
                   "workload": f"prompt {s.prompt}, output {s.output}, routing {s.routing}, "
                               f"{s.num_requests} requests"}
            for sched in (*SCHEDULERS, STATIC):
                row[sched] = results[(s, label, sched)]
            out.append(row)
    return out


# -- real runs ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`moeflow serve` in a subprocess, stopped with SIGINT. With `http` it also serves the
    OpenAI-compatible front end at `base_url`, over the same engine."""

    def __init__(self, model: Path, scheduler: str, devices: str, transport: str,
                 http: bool = False) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "moeflow.cli", "serve", str(model), "--bind", self.address,
               "--scheduler", scheduler, "--devices", devices, "--transport", transport,
               "--max-waiting", "1024"]
        self.base_url = ""
        if http:
            host_port = f"127.0.0.1:{free_port()}"
            cmd += ["--http", host_port]
            self.base_url = f"http://{host_port}"
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], STARTUP_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("serving"):
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"moeflow serve did not start within {STARTUP_S:g} s "
                               f"({' '.join(cmd)}): {line!r}")
        if http and not http_ready(self.base_url, started + STARTUP_S):
            self.__exit__()
            raise RuntimeError(f"moeflow serve answered no GET {self.base_url}/health within "
                               f"{STARTUP_S:g} s ({' '.join(cmd)})")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def http_ready(base_url: str, deadline: float) -> bool:
    """Whether GET /health answers 200 before `deadline` (time.monotonic())."""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def real_checkpoint(path: Path = REAL_CHECKPOINT, dtype: str = "bfloat16") -> Path:
    """The real runs' checkpoint (an 8-layer, 32-expert Qwen3-MoE), built once at `path`."""
    from moeflow.models.tiny import TinyShape, make_tiny

    if not (path / "config.json").exists():
        shape = TinyShape(layers=8, experts=32, top_k=4, hidden=512, heads=8, kv_heads=2,
                          head_dim=64, intermediate=512, vocab=8192)
        make_tiny("qwen3_moe", path, shape, dtype=dtype, seed=0)
    return path


def real_bench(address: str, arrivals: str, num_requests: int, prompt: str, output: str,
               backend: str = "zmq") -> dict[str, float]:
    """One run of `moeflow bench`'s driver; its summary in this benchmark's terms."""
    from moeflow.serve.bench import run_bench

    return bench_terms(run_bench(address, arrivals, num_requests, prompt, output, seed=0,
                                 backend=backend))


def bench_terms(result: dict[str, Any]) -> dict[str, float]:
    """A `moeflow bench` result in this benchmark's terms; RuntimeError if a request failed."""
    summary = result["summary"]
    if summary["num_errors"]:
        errors = {r["error"] for r in result["records"] if r["error"] is not None}
        raise RuntimeError(f"{summary['num_errors']} request(s) failed: {errors}")
    return {"throughput_tok_s": summary["output_tokens_per_s"],
            "p50_e2e_s": summary["e2e_ms"]["p50"] / 1e3,
            "p99_e2e_s": summary["e2e_ms"]["p99"] / 1e3,
            "requests": summary["num_requests"], "requests_per_s": summary["requests_per_s"],
            "mean_ttft_ms": summary["ttft_ms"]["mean"],
            "mean_tpot_ms": summary["tpot_ms"]["mean"],
            "mean_itl_ms": summary["itl_ms"]["mean"], "p99_itl_ms": summary["itl_ms"]["p99"]}


def run_real(model: Path, num_requests: int, prompt: str, output: str, devices: str,
             transport: str) -> list[dict[str, Any]]:
    results: dict[tuple[str, str], dict[str, float]] = {}
    bar = Progress(len(SCHEDULERS) * (len(LOADS) + 1), "real runs")
    step = 0
    capacity = 0.0
    for sched in SCHEDULERS:  # one server per policy at a time: 2 cores, no sharing
        with Server(model, sched, devices, transport) as server:
            # a burst first on every server: it warms each alike, and batch-ep's measures
            # the capacity the offered loads are fractions of
            burst = real_bench(server.address, "burst", num_requests, prompt, output)
            if sched == "batch-ep":
                capacity = burst["requests_per_s"]
            step += 1
            bar.update(step)
            for label, frac in LOADS:
                results[(label, sched)] = real_bench(
                    server.address, f"poisson:rate={frac * capacity:.6g}", num_requests,
                    prompt, output)
                step += 1
                bar.update(step)
    rows = []
    for label, frac in LOADS:
        row: dict[str, Any] = {
            "setting": f"{model.name}, {devices} ({transport})", "load": label,
            "offered_req_s": frac * capacity, "capacity_req_s": capacity,
            "workload": f"prompt {prompt}, output {output}, {num_requests} requests"}
        for sched in SCHEDULERS:
            row[sched] = results[(label, sched)]
        rows.append(row)
    return rows


def real_bench_together(targets: dict[str, str], arrivals: str, num_requests: int,
                        prompt: str, output: str) -> dict[str, dict[str, float]]:
    """Each front end its own copy of one workload, both at once: request i of each arrives
    at the same moment, so the copies share the engine's steps and the machine's noise."""
    from moeflow.serve.bench import bench
    from moeflow.sim.workload import Lengths, requests

    workload = requests(arrivals, num_requests, Lengths.parse(prompt), Lengths.parse(output),
                        seed=0)

    async def both() -> dict[str, dict[str, float]]:
        async with asyncio.TaskGroup() as tasks:
            runs = {name: tasks.create_task(bench(targets[backend], workload, backend=backend,
                                                  label=arrivals))
                    for name, backend in FRONT_ENDS}
        return {name: bench_terms(run.result()) for name, run in runs.items()}

    return asyncio.run(both())


def run_http(model: Path, num_requests: int, prompt: str, output: str, devices: str,
             transport: str) -> list[dict[str, Any]]:
    """The same loads through ZeroMQ and through HTTP/SSE against one batch-ep server: one
    after the other, then both at once (each at half the rate: the same load in all)."""
    results: dict[tuple[str, str], dict[str, float]] = {}
    bar = Progress(len(FRONT_ENDS) + 3 * len(LOADS), "zmq/http runs")
    step = 0
    with Server(model, "batch-ep", devices, transport, http=True) as server:
        targets = {"zmq": server.address, "openai": server.base_url}
        # a burst through each first: it warms both paths alike, and ZeroMQ's measures the
        # capacity the offered loads are fractions of
        bursts = {}
        for name, backend in FRONT_ENDS:
            bursts[name] = real_bench(targets[backend], "burst", num_requests, prompt, output,
                                      backend)
            step += 1
            bar.update(step)
        capacity = bursts["zmq"]["requests_per_s"]
        for i, (label, frac) in enumerate(LOADS):
            # alternating which goes first keeps a drift in the machine off one side
            for name, backend in FRONT_ENDS[::1 if i % 2 == 0 else -1]:
                results[(label, name)] = real_bench(
                    targets[backend], f"poisson:rate={frac * capacity:.6g}", num_requests,
                    prompt, output, backend)
                step += 1
                bar.update(step)
            together = real_bench_together(targets, f"poisson:rate={frac * capacity / 2:.6g}",
                                           num_requests, prompt, output)
            for name, terms in together.items():
                results[(label, f"{name}_together")] = terms
            step += 1
            bar.update(step)
    rows = []
    for label, frac in LOADS:
        row: dict[str, Any] = {
            "setting": f"{model.name}, {devices} ({transport}), batch-ep", "load": label,
            "offered_req_s": frac * capacity, "capacity_req_s": capacity,
            "workload": f"prompt {prompt}, output {output}, {num_requests} requests"}
        for suffix in ("", "_together"):
            zmq, http = results[(label, "zmq" + suffix)], results[(label, "http" + suffix)]
            row["zmq" + suffix], row["http" + suffix] = zmq, http
            for metric in ("itl", "tpot"):
                row[f"{metric}_overhead{suffix}_pct"] = (
                    http[f"mean_{metric}_ms"] / zmq[f"mean_{metric}_ms"] - 1) * 100
        rows.append(row)
    return rows


# -- report ------------------------------------------------------------------------


def add_ratios(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        base, fine = row["batch-ep"], row["fine-ep"]
        row["p99_ratio"] = fine["p99_e2e_s"] / base["p99_e2e_s"]
        row["throughput_ratio"] = fine["throughput_tok_s"] / base["throughput_tok_s"]
        row["goal_met"] = row["p99_ratio"] <= 0.5 and row["throughput_ratio"] >= 0.95
        if STATIC in row:
            static = row[STATIC]
            row["p99_ratio_vs_static"] = fine["p99_e2e_s"] / static["p99_e2e_s"]
            row["throughput_ratio_vs_static"] = (fine["throughput_tok_s"]
                                                 / static["throughput_tok_s"])


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'setting':38s} {'load':16s} {'req/s':>7s}  {'tok/s batch':>11s} "
            f"{'tok/s fine':>10s} {'p99 batch':>9s} {'p99 fine':>9s}  {'p99 ratio':>9s} "
            f"{'thr ratio':>9s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        b, f = r["batch-ep"], r["fine-ep"]
        lines.append(f"{r['setting']:38s} {r['load']:16s} {r['offered_req_s']:7.2f}  "
                     f"{b['throughput_tok_s']:11.0f} {f['throughput_tok_s']:10.0f} "
                     f"{b['p99_e2e_s']:8.2f}s {f['p99_e2e_s']:8.2f}s  "
                     f"{r['p99_ratio']:9.2f} {r['throughput_ratio']:9.2f}")
    lines.append("p99 ratio = fine-ep p99 e2e / batch-ep p99 e2e (goal <= 0.50); "
                 "thr ratio = fine-ep / batch-ep output tokens/s (goal >= 0.95)")
    if any(STATIC in r for r in rows):
        lines += ["", f"context: against {STATIC} (new requests join only between batches)",
                  f"{'setting':38s} {'load':16s} {'p99 static':>10s} {'p99 fine':>9s} "
                  f"{'p99 ratio':>9s} {'thr ratio':>9s}"]
        for r in rows:
            lines.append(f"{r['setting']:38s} {r['load']:16s} {r[STATIC]['p99_e2e_s']:9.2f}s "
                         f"{r['fine-ep']['p99_e2e_s']:8.2f}s {r['p99_ratio_vs_static']:9.2f} "
                         f"{r['throughput_ratio_vs_static']:9.2f}")
    return "\n".join(lines)


def http_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'load':16s} {'req/s':>6s}  {'ttft zmq':>8s} {'ttft http':>9s}  "
            f"{'tpot zmq':>8s} {'tpot http':>9s}  {'itl zmq':>8s} {'itl http':>8s}  "
            f"{'p99 itl zmq':>11s} {'p99 itl http':>12s}  {'tpot +%':>7s} {'itl +%':>7s}")
    lines = [f"{rows[0]['setting']}; {rows[0]['workload']}"]
    for suffix, title in (("", "one after the other"),
                          ("_together", "both at once, each at half the rate")):
        lines += ["", title, head, "-" * len(head)]
        for r in rows:
            z, h = r["zmq" + suffix], r["http" + suffix]
            lines.append(f"{r['load']:16s} {r['offered_req_s']:6.2f}  "
                         f"{z['mean_ttft_ms']:8.1f} {h['mean_ttft_ms']:9.1f}  "
                         f"{z['mean_tpot_ms']:8.1f} {h['mean_tpot_ms']:9.1f}  "
                         f"{z['mean_itl_ms']:8.1f} {h['mean_itl_ms']:8.1f}  "
                         f"{z['p99_itl_ms']:11.1f} {h['p99_itl_ms']:12.1f}  "
                         f"{r[f'tpot_overhead{suffix}_pct']:+7.1f} "
                         f"{r[f'itl_overhead{suffix}_pct']:+7.1f}")
    lines.append("latencies: means in ms; +% = the latency HTTP/SSE adds per token over ZeroMQ "
                 "(mean TPOT, mean ITL; goal <= 10 % on the demo checkpoint)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", action="store_true", help="only the simulated settings")
    ap.add_argument("--real", action="store_true", help="only the real runs")
    ap.add_argument("--http", action="store_true",
                    help="only ZeroMQ against HTTP/SSE on one real server")
    ap.add_argument("--quick", action="store_true", help="fewer requests per run")
    ap.add_argument("--model", type=Path, help="checkpoint for the real runs (default: "
                    f"build {REAL_CHECKPOINT})")
    ap.add_argument("--devices", default="cpu:0,cpu:1")
    ap.add_argument("--json", dest="json_out", help="write every row as JSON here")
    args = ap.parse_args()
    from moeflow.cli import check_output

    check_output(ap, args.json_out, "--json")  # before minutes of measuring
    both = not args.sim and not args.real and not args.http
    report: dict[str, Any] = {}
    if args.sim or both:
        settings = SIM_SETTINGS
        if args.quick:
            settings = tuple(SimSetting(s.model, s.hardware, s.prompt, s.output, s.routing,
                                        max(10, s.num_requests // 3)) for s in settings)
        rows = run_sim(settings, workers=min(2, os.cpu_count() or 1))
        add_ratios(rows)
        report["simulated"] = rows
        print("# simulated at paper scale\n" + table(rows) + "\n", flush=True)
    if args.real or both:
        model = args.model or real_checkpoint()
        n = 16 if args.quick else 48
        rows = run_real(model, n, "uniform:16-128", "uniform:8-48", args.devices, "zmq")
        add_ratios(rows)
        report["real"] = rows
        print("# real: moeflow serve, 2 CPU actor processes\n" + table(rows), flush=True)
    if args.http:
        model = args.model or real_checkpoint()
        n = 16 if args.quick else 48
        rows = run_http(model, n, "uniform:16-128", "uniform:8-48", args.devices, "zmq")
        report["http"] = rows
        print("# real: ZeroMQ against HTTP/SSE, one moeflow serve\n" + http_table(rows),
              flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
