"""The simulator, its cost model, presets and workloads."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest

from moeflow.cli import main as cli_main
from moeflow.scheduler import BatchEP
from moeflow.sim import hardware, models
from moeflow.sim.cost import CostModel
from moeflow.sim.hardware import HardwareError
from moeflow.sim.simulator import SimulationError, Simulator, percentile
from moeflow.sim.workload import SUBSETS, Lengths, Routing, SimRequest, WorkloadError, requests

PUBLISHED = {  # (total, active) parameters in billions, from the models' own cards
    "mixtral-8x7b": (46.7, 12.9), "mixtral-8x22b": (141, 39), "dbrx": (132, 36),
    "deepseek-v2": (236, 21), "qwen3-30b-a3b": (30.5, 3.3), "olmoe-1b-7b": (6.9, 1.3),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_presets_have_their_published_sizes(name):
    spec = models.load(name)
    total, active = PUBLISHED[name]
    assert spec.total_params() / 1e9 == pytest.approx(total, rel=0.03)
    # active counts here include one embedding row, not the whole embedding table
    embed = spec.vocab_size * spec.hidden_size / 1e9
    assert spec.active_params_per_token() / 1e9 == pytest.approx(active, abs=embed + 0.3)


def test_hardware_presets_and_files(tmp_path):
    table = hardware.presets()
    for name in ("t4", "l4", "a100-80g", "h100", "h800", "h200"):
        assert table[name].num_devices == 1 and table[f"{name}x8"].num_devices == 8
    assert table["h800"].link.bandwidth < table["h100"].link.bandwidth  # the export NVLink
    assert table["t4"].device.flops_for("bfloat16") == 65e12  # runs fp16 tensor cores
    path = tmp_path / "hw.json"
    path.write_text(table["h100x8"].to_json())
    assert hardware.load(str(path)) == table["h100x8"]
    with pytest.raises(HardwareError, match="unknown hardware 'tpu'"):
        hardware.load("tpu")
    with pytest.raises(HardwareError, match="not a hardware description"):
        (tmp_path / "bad.json").write_text("{}")
        hardware.load(str(tmp_path / "bad.json"))


def sim(model: str, hw, scheduler=None, routing: str = "uniform", **kw) -> Simulator:
    spec = models.load(model)
    r = Routing.parse(routing, spec.moe.num_experts, spec.moe.top_k, spec.num_layers, seed=0)
    return Simulator(spec, hw if not isinstance(hw, str) else hardware.load(hw),
                     scheduler or BatchEP(), r, **kw)


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "olmoe-1b-7b"])
def test_batch1_decode_on_h100_is_the_bandwidth_roofline_plus_its_overheads(model):
    """Without launch overhead, batch-1 decode takes active weight bytes / HBM bandwidth
    (plus the KV cache and activations, a few percent); with it, that plus one launch per
    kernel."""
    h100 = hardware.load("h100")
    free = dataclasses.replace(h100, device=dataclasses.replace(h100.device, launch_overhead=0))
    s = sim(model, free)
    floor = s.cost.decode_step_floor()
    assert floor == pytest.approx(models.load(model).active_params_per_token() * 2 / 3.35e12)
    tpot = s.run([SimRequest(0.0, 16, 33)]).timings[0].tpot
    assert floor <= tpot <= 1.08 * floor
    real = sim(model, h100)
    trace = real.run([SimRequest(0.0, 16, 33)])
    decode_kernels = sum(real.cost.cost(job.plan.graph, n, [1] * len(getattr(n, "experts", ())))
                         .kernels for job in trace.jobs[-1:] for n in job.plan.graph.nodes)
    expected = tpot + decode_kernels * h100.device.launch_overhead
    assert trace.timings[0].tpot == pytest.approx(expected, rel=0.03)


def test_a_model_too_big_for_the_hardware_is_refused():
    with pytest.raises(SimulationError, match="mixtral-8x7b does not fit on h100"):
        sim("mixtral-8x7b", "h100")


def test_runs_are_deterministic_and_finish_every_request():
    reqs = requests("poisson:rate=50", 12, Lengths.parse("uniform:32-128"),
                    Lengths.parse("uniform:4-16"), seed=3)
    a = sim("olmoe-1b-7b", "h100x8").run(reqs)
    b = sim("olmoe-1b-7b", "h100x8").run(reqs)
    assert a.metrics == b.metrics and len(a.timings) == 12
    assert [t.output for t in a.timings] == [r.output for r in reqs]
    assert all(t.first_token >= t.arrival and t.finish >= t.first_token for t in a.timings)
    assert not a.memory_violations
    # every node ran on its own lane, one at a time
    for spans in a.stream_orders().values():
        assert len(spans) == len(set(spans))


def test_skewed_routing_loads_the_hot_experts_owner_more():
    reqs = requests("burst", 8, Lengths.parse("fixed:256"), Lengths.parse("fixed:2"))
    uniform = sim("olmoe-1b-7b", "h100x8").run(reqs).metrics.utilization
    skewed = sim("olmoe-1b-7b", "h100x8", routing="zipf:s=2.0").run(reqs).metrics.utilization
    spread = lambda u: max(u.values()) - min(v for k, v in u.items() if "compute" in k)  # noqa: E731
    assert spread(skewed) > spread(uniform)


def test_arrivals_spanning_more_than_float_seconds_keep_exact_are_refused(tmp_path):
    """A rate of 1e-300 once simulated a makespan of 300 digits with every latency 0.00 ms
    (the steps lost in rounding times that large): arrivals must span at most
    MAX_SPAN_S."""
    from moeflow.sim.workload import MAX_SPAN_S

    one = Lengths.parse("fixed:1")
    for rate in ("1e-300", "1e-8"):
        with pytest.raises(WorkloadError, match="span .* a higher rate"):
            requests(f"poisson:rate={rate}", 3, one, one)
    assert requests("poisson:rate=1e-6", 3, one, one)[-1].arrival < MAX_SPAN_S
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival": 5}\n{"arrival": 200000005}\n')
    with pytest.raises(WorkloadError, match="span 2e\\+08 s.*a shorter trace"):
        requests(f"trace:{trace}", 0, one, one)
    trace.write_text('{"arrival": 1700000000.5}\n{"arrival": 1700000001}\n')  # Unix times
    assert [r.arrival for r in requests(f"trace:{trace}", 0, one, one)] == [0.0, 0.5]


def test_workloads_and_routing_models():
    reqs = requests("poisson:rate=100", 2000, Lengths.parse("fixed:8"), Lengths.parse("fixed:4"))
    gaps = [b.arrival - a.arrival for a, b in zip(reqs, reqs[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.01, rel=0.1)
    assert all(r.arrival == 0 for r in requests("burst", 3, Lengths.parse("fixed:1"),
                                                Lengths.parse("fixed:1")))
    lengths = [Lengths.parse("uniform:5-9").draw(__import__("random").Random(i)) for i in range(50)]
    assert min(lengths) >= 5 and max(lengths) <= 9
    for bad in ("poisson", "poisson:rate=-1", "gamma:rate=1"):
        with pytest.raises(WorkloadError):
            requests(bad, 3, Lengths.parse("fixed:1"), Lengths.parse("fixed:1"))
    with pytest.raises(WorkloadError, match="bad length"):
        Lengths.parse("uniform:9-5")
    r = Routing.parse("uniform", 16, 4, 2, seed=0)
    for tokens in (1, 10, 500):
        counts = r.counts(0, tokens)
        assert sum(counts) == 4 * tokens and max(counts) <= tokens
    from moeflow.dataflow import Placement
    remote = Routing.parse("remote", 8, 2, 1, seed=0)
    placement = Placement.sharded(("a", "b"), 8)
    counts = remote.counts(0, 20, "a", placement)
    assert sum(counts[:4]) == 0 and sum(counts) == 40  # never the home's own experts


def test_recorded_routing(tmp_path):
    rec = tmp_path / "routing.json"
    rec.write_text(json.dumps({"layers": {"0": [100, 0, 0, 1], "1": [1, 1, 1, 1]}}))
    r = Routing.parse(f"recorded:{rec}", 4, 1, 2, seed=0)
    counts = r.counts(0, 200)
    assert counts[0] > 150 and counts[1] == counts[2] == 0
    with pytest.raises(WorkloadError, match="layer 0 has 4 experts, the model 8"):
        Routing.parse(f"recorded:{rec}", 8, 1, 2)


def test_routing_recorded_from_a_real_run_drives_the_simulator(tiny_factory, tmp_path):
    model = tiny_factory("olmoe")
    rec = tmp_path / "routing.json"
    assert cli_main(["generate", str(model), "--prompt-ids", ",".join(map(str, range(3, 40))),
                     "--max-new-tokens", "4", "--record-routing", str(rec)]) == 0
    data = json.loads(rec.read_text())
    spec = models.load(str(model))
    assert sorted(data["layers"]) == ["0", "1"]
    # 37 prompt tokens + 3 decoded tokens fed back, top-2 each, in every layer
    assert all(sum(c) == 40 * spec.moe.top_k for c in data["layers"].values())
    assert cli_main(["simulate", "--model", str(model), "--hardware", "h100",
                     "--routing", f"recorded:{rec}", "--num-requests", "2",
                     "--prompt-len", "fixed:16", "--output-len", "fixed:2"]) == 0


def test_percentile():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([7], 99) == 7


def test_cost_model_prefill_is_compute_bound_and_decode_memory_bound():
    from moeflow.dataflow import Placement, SeqChunk, Unit, compile

    spec = models.load("mixtral-8x7b")
    cost = CostModel(spec, hardware.load("h100x8"))
    placement = Placement.sharded(hardware.load("h100x8").device_names(), 8)
    for tokens, bound in ((4096, "compute"), (1, "memory")):
        g = compile(spec, Unit((SeqChunk(0, 0, tokens, "cuda:0"),)), placement)
        attn = g.nodes[1]
        c = cost.cost(g, attn)
        compute = c.flops / cost.peak
        memory = c.bytes / cost.hw.device.mem_bandwidth
        assert (compute > memory) == (bound == "compute")


def test_simulate_cli_prints_metrics_and_writes_a_perfetto_trace(tmp_path, capsys):
    trace = tmp_path / "out.json"
    timeline = tmp_path / "out.html"
    args = ["simulate", "--model", "olmoe-1b-7b", "--hardware", "a100-80gx8", "--scheduler",
            "batch-ep", "--workload", "poisson:rate=20", "--num-requests", "4",
            "--prompt-len", "fixed:64", "--output-len", "fixed:3"]
    assert cli_main([*args, "--trace", str(trace), "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr()
    assert "throughput" in out.out and "p99" in out.out and "simulating" in out.err
    data = json.loads(trace.read_text())
    events = data["traceEvents"]
    lanes = {(e["pid"], e["tid"]) for e in events if e["ph"] == "X"}
    process = {e["pid"]: e["args"]["name"] for e in events
               if e["ph"] == "M" and e["name"] == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
              if e["ph"] == "M" and e["name"] == "thread_name"}
    resources = {f"{process[p]}/{thread[(p, t)]}" for p, t in lanes}
    # one lane per resource: every device's compute and send streams, each its own lane
    assert len(resources) == len(lanes) == 16
    assert {"cuda:0/compute", "cuda:7/send"} <= resources
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["num_requests"] == 4
    assert cli_main([*args, "--trace", str(timeline)]) == 0
    assert "<svg" in timeline.read_text()
    assert cli_main(["simulate", "--model", "nope", "--hardware", "h100"]) == 2


# -- replayed plans, bounded memory ----------------------------------------------------


def mixed_requests(n: int = 10, output: str = "uniform:2-12") -> list[SimRequest]:
    return requests("poisson:rate=80", n, Lengths.parse("uniform:8-80"), Lengths.parse(output),
                    seed=5)


def recorded(result) -> tuple:
    return (result.metrics, result.timings, result.trace, result.durations,
            result.memory_violations, [(j.job_id, j.unit) for j in result.jobs])


@pytest.mark.parametrize("scheduler", ["batch-ep", "fine-ep"])
def test_replayed_plans_give_what_planning_every_unit_anew_gives(scheduler):
    """Units of one shape replay one plan with their own sizes bound: the run is the one
    that plans (and compiles) every unit."""
    from moeflow.scheduler.registry import make_scheduler

    reqs = mixed_requests(6, "uniform:2-6")
    replayed = sim("deepseek-v2", "h200x8", make_scheduler(scheduler)).run(reqs)
    fresh = sim("deepseek-v2", "h200x8", make_scheduler(scheduler), plan_cache=0).run(reqs)
    assert recorded(replayed) == recorded(fresh)
    plans = {id(j.plan) for j in replayed.jobs}
    assert len(plans) < len(replayed.jobs) == replayed.num_units  # some plans were replayed


def test_a_plan_whose_sizes_do_not_follow_its_unit_is_planned_anew():
    from moeflow.dataflow import Combine, Graph
    from moeflow.scheduler import topological_plan
    from moeflow.sim.replay import PlanTable

    class Padded(BatchEP):
        """Combines claim one token more than their unit has."""

        def plan(self, unit, model, cluster):
            g = super().plan(unit, model, cluster).graph
            nodes = tuple(dataclasses.replace(n, num_tokens=n.num_tokens + 1)
                          if isinstance(n, Combine) else n for n in g.nodes)
            return topological_plan(Graph(g.unit, g.placement, nodes, g.edges, g.num_layers))

    reqs = mixed_requests()
    s = sim("olmoe-1b-7b", "h100x8", Padded())
    assert not PlanTable.of(Padded().plan(requests_unit(), s.model, s.cluster),
                            s.placement.devices).rebindable
    assert recorded(s.run(reqs)) == recorded(
        sim("olmoe-1b-7b", "h100x8", Padded(), plan_cache=0).run(reqs))


def requests_unit():
    from moeflow.dataflow import SeqChunk, Unit

    return Unit((SeqChunk(0, 0, 5, "cuda:0"), SeqChunk(1, 3, 1, "cuda:1")))


def test_unrecorded_runs_keep_nothing_per_event_and_give_the_same_metrics():
    reqs = mixed_requests()
    full = sim("olmoe-1b-7b", "h100x8").run(reqs)
    bare = sim("olmoe-1b-7b", "h100x8").run(reqs, record=False)
    assert bare.metrics == full.metrics and bare.timings == full.timings
    assert bare.trace == [] and bare.jobs == [] and bare.durations == {}
    assert bare.num_events == len(full.trace) and bare.num_units == len(full.jobs)


def test_memory_grows_with_requests_not_with_events():
    """Five times the decode steps, no more memory: plans are released when done and
    nothing is kept per event (the plan cache fills in the first steps already)."""
    import gc
    import tracemalloc

    def peak(output: str) -> tuple[int, int]:
        s = sim("olmoe-1b-7b", "h100x8")
        reqs = mixed_requests(4, output)
        gc.collect()
        tracemalloc.start()
        result = s.run(reqs, record=False)
        _, high = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return high, result.num_events

    short, short_events = peak("fixed:64")  # the plan cache is full by then
    long, long_events = peak("fixed:320")
    assert long_events > 4 * short_events
    assert long < 1.2 * short


def test_coalesced_groups_count_once_in_utilization():
    from moeflow.scheduler import FineEP

    reqs = requests("burst", 16, Lengths.parse("fixed:32"), Lengths.parse("fixed:4"))
    result = sim("olmoe-1b-7b", "h100x8", FineEP()).run(reqs)
    assert any(sum(1 for e in result.trace if e.group == g) > 1
               for g in {e.group for e in result.trace})  # some kernels are groups
    assert max(result.metrics.utilization.values()) <= 1.0 + 1e-9


def test_routing_draws_as_a_full_sort_of_keys_does():
    """The exact path picks each token's top-k like a reverse sort of (r^(1/w), expert)
    over every expert (-1 for weight 0), from the same random numbers; with equal weights,
    as one uniform sample of k."""
    import random

    from moeflow.dataflow import Placement

    def reference(r: Routing, layer, num_tokens, home, placement):
        weights = list(r.weights[layer])
        if r.kind == "remote":
            local = set(placement.experts_of(home))
            if len(local) <= r.num_experts - r.top_k:
                weights = [0.0 if e in local else w for e, w in enumerate(weights)]
        counts = [0] * r.num_experts
        live = [e for e, w in enumerate(weights) if w > 0]
        for _ in range(num_tokens):
            if all(weights[e] == 1.0 for e in live) and len(live) >= r.top_k:
                # equal weights: a uniform sample of k, one of the few subsets of k
                picked = (rng.choices(list(itertools.combinations(live, r.top_k)))[0]
                          if math.comb(len(live), r.top_k) <= SUBSETS
                          else rng.sample(live, r.top_k))
            else:
                keys = [(rng.random() ** (1.0 / w) if w > 0 else -1.0, e)
                        for e, w in enumerate(weights)]
                picked = [e for _, e in sorted(keys, reverse=True)[:r.top_k]]
            for e in picked:
                counts[e] += 1
        return tuple(counts)

    for kind in ("uniform", "zipf:s=1.5", "remote"):
        for experts, k in ((8, 2), (160, 6), (4, 4), (3, 2)):
            r = Routing.parse(kind, experts, k, 2, seed=1)
            placement = Placement.sharded(("a", "b"), experts)
            rng = random.Random(7)
            r.rng = random.Random(7)
            for layer, tokens in ((0, 1), (1, 7), (0, 64)):
                assert r.counts(layer, tokens, "a", placement) == reference(
                    r, layer, tokens, "a", placement), (kind, experts, k, tokens)


def test_starting_every_startable_group_at_once_is_starting_each():
    """`Execution.start_startable`, which the simulator drives, starts what `startable`
    offers, as `start` would."""
    from moeflow.scheduler import Execution
    from moeflow.scheduler.registry import make_scheduler

    from moeflow.dataflow import SeqChunk, Unit

    s = sim("olmoe-1b-7b", "h100x8")
    units = [Unit((SeqChunk(0, 0, 5, "cuda:0"),)), Unit((SeqChunk(1, 3, 1, "cuda:1"),))]
    for name in ("batch-ep", "fine-ep"):
        plans = [make_scheduler(name).plan(u, s.model, s.cluster) for u in units]
        a, b = Execution(plans), Execution(plans)
        while not a.done:
            offered = b.startable()
            for group in offered:
                b.start(group)
            started = a.start_startable()
            assert started == offered
            for group in started:
                for task in group:
                    assert a.finish(task) == b.finish(task)
        assert b.done


def test_simulate_cli_shows_the_expert_kernels_an_on_routing_chose(tmp_path, capsys,
                                                                    monkeypatch):
    # a plugin eps with costs of its own keeps its band (the preset's costs would turn it
    # off): every expert group over 0 rows per expert runs dense
    (tmp_path / "banded.py").write_text(
        "from moeflow.scheduler import EPS, AnalyticCosts\n"
        "class Banded(EPS):\n"
        "    def __init__(self):\n"
        "        super().__init__(costs=AnalyticCosts(2048, 1024, 2), kernel_band=(0, 0))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["simulate", "--model", "olmoe-1b-7b", "--hardware", "a100-80gx8", "--scheduler",
            "banded:Banded", "--workload", "poisson:rate=20", "--num-requests", "4",
            "--prompt-len", "fixed:64", "--output-len", "fixed:2",
            "--json", str(tmp_path / "m.json")]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    layers = models.load("olmoe-1b-7b").num_layers
    assert "expert kernels (on_routing): dense " in out and f"over {layers} layers" in out
    kernels = json.loads((tmp_path / "m.json").read_text())["kernels"]
    assert len(kernels) == layers and all(set(k) == {"dense"} for k in kernels.values())


def test_simulate_does_not_import_torch(tmp_path):
    """`moeflow simulate` is pure Python: torch's import alone is ~1 s of a short run."""
    import subprocess
    import sys

    code = ("import sys; from moeflow.cli import main; "
            "rc = main(['simulate', '--model', 'mixtral-8x7b', '--hardware', 'h100x8', "
            "'--num-requests', '2', '--trace', sys.argv[1]]); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.json")], check=True,
                   capture_output=True)


def test_every_row_dispatched_to_other_devices_comes_back_in_their_combines():
    """A dispatch goes to every other owner at once, a combine back to every other home:
    sized from different gates (a dispatch by its home's, a combine by all the others'),
    the rows they move still balance in each layer of each step."""
    from moeflow.dataflow.graph import Transfer

    hw = hardware.load("h100x4")
    burst = requests("burst", 8, Lengths.parse("fixed:16"), Lengths.parse("fixed:4"))
    result = sim("olmoe-1b-7b", hw).run(burst)  # every device a home
    link, row_bytes = hw.link, models.load("olmoe-1b-7b").hidden_size * 2
    moved: dict[tuple[int, int, str], float] = {}
    fans = 0
    for (job, node_id), seconds in result.durations.items():
        node = result.jobs[job].plan.graph.nodes[node_id]
        if isinstance(node, Transfer) and node.payload in ("dispatch", "combine"):
            fans += len(node.dsts) > 1
            rows = ((seconds - len(node.dsts) * link.latency) * link.bandwidth / row_bytes
                    if seconds else 0.0)
            key = (job, node.layer, node.payload)
            moved[key] = moved.get(key, 0.0) + rows
    assert fans  # transfers to several devices were there
    assert {h for job in result.jobs for h in job.unit.homes(hw.device_names())} == set(
        hw.device_names())
    layers = {(job, layer) for job, layer, _ in moved}
    assert any(moved.get((j, layer, "dispatch"), 0) > 0 for j, layer in layers)
    for job, layer in layers:
        assert moved.get((job, layer, "dispatch"), 0.0) == pytest.approx(
            moved.get((job, layer, "combine"), 0.0), rel=1e-6, abs=1e-6)


def test_the_metrics_table_lists_devices_in_natural_order_and_no_nan():
    reqs = requests("burst", 16, Lengths.parse("fixed:64"), Lengths.parse("fixed:1"))
    metrics = sim("mixtral-8x7b", "h100x16").run(reqs, record=False).metrics
    devices = list(dict.fromkeys(r.split("/")[0] for r in metrics.utilization))
    assert devices == sorted(devices, key=lambda d: int(d.split(":")[1]))
    table = metrics.table()
    assert "nan" not in table and "TPOT" in table  # one token each: no time per token


def test_token_progress_is_reported_as_units_finish_not_only_at_the_end():
    reqs = requests("burst", 4, Lengths.parse("fixed:32"), Lengths.parse("fixed:10"))
    seen: list[tuple[int, int]] = []
    sim("olmoe-1b-7b", "h100x8").run(reqs, record=False,
                                     token_progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (40, 40) and len(seen) >= 10
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_cpu_node_has_no_invented_host_and_a_gpu_node_a_server_cpu():
    """`moeflow calibrate` on a CPU machine used to write a generic server CPU as its
    "host", which nothing reads: a node of CPUs is its own host."""
    from moeflow.sim.hardware import HOST, DeviceSpec, Hardware, LinkSpec

    link = LinkSpec(40e9)
    cpu = Hardware("cpu-calibrated", DeviceSpec("cpu-2t", "cpu", {"bfloat16": 3e11}, 3e10,
                                                2.4e10), 1, link, link, 2.4e10)
    assert cpu.host is None and json.loads(cpu.to_json())["host"] is None
    assert hardware.Hardware.from_dict(json.loads(cpu.to_json())) == cpu
    assert cpu.with_host() == ("cpu:0",) and cpu.spec("cpu:0") is cpu.device
    gpu = hardware.presets()["h100"]
    assert gpu.host is not None and gpu.spec(HOST) is gpu.host and HOST in gpu.with_host()


def test_the_activation_reserve_bounds_the_mlp_intermediates_too():
    """Per token, (6 + 3k) rows of D, and a layer's MLP intermediates: gate/up and their
    product, 3 rows of the FFN width for each of the k routed rows (a shared expert's and
    a dense layer's counted too), plus fp32 logits per sequence. Mixtral's intermediates
    are 1.7x the rest: without them the bound fell short."""
    from moeflow.sim.simulator import activation_bytes

    spec = models.load("mixtral-8x7b")
    rows = (6 + 3 * 2) * 4096
    ffn = 3 * 2 * 14336
    assert activation_bytes(spec, 4096, 8, 2) == 4096 * (rows + ffn) * 2 + 8 * 32000 * 4
    ds = models.load("deepseek-v2")  # a shared expert, and a first dense layer
    moe = ds.moe
    per_token = activation_bytes(ds, 1, 0, 1) - (6 + 3 * moe.top_k) * ds.hidden_size
    assert per_token == 3 * max(moe.top_k * moe.intermediate_size
                                + moe.shared_intermediate_size, ds.dense_intermediate_size)
