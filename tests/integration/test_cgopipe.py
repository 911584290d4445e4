"""cgopipe and flexgen: they pass the conformance suite with invariant 8, broken variants are
caught, and both give batch-ep's logits and greedy tokens while the GPU (cpu:0) holds only
its own experts and pages in the rest, in process for every family and across actor
processes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moeflow.actors.coordinator import ZmqExecutor
from moeflow.actors.inproc import InProcessExecutor, load_workers
from moeflow.dataflow.graph import Graph, SeqChunk, Transfer, Unit
from moeflow.models.families import load_spec
from moeflow.scheduler import BatchEP, Cluster
from moeflow.scheduler.base import Budget
from moeflow.scheduler.cgopipe import CGOPipe, FlexGen
from moeflow.scheduler.plan import topological_plan
from moeflow.testing import ConformanceError, check_scheduler
from moeflow.testing.conformance import (
    Case, assert_same_generation, check_simulated, policy_checks, record_generation,
)
from moeflow.testing.strategies import ClusterCase, ModelCase, WorkloadCase
from moeflow.sim.workload import SimRequest

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
            "gpt_oss")
PROMPTS = [[5, 17, 33, 2, 99, 250, 7, 8, 9, 10, 11, 300, 301], [8, 9, 10],
           [300, 301, 302, 303, 304, 305, 306, 40, 41], [77, 78], [12, 13, 14, 15, 16]]
ATOL = 1e-4  # as the transformers oracle


class FourMicroBatches(CGOPipe):
    name = "cgopipe-4"

    def __init__(self) -> None:
        super().__init__(micro_batches=4, pages=3)


class SlicedPages(CGOPipe):
    """More pages than the host has experts: each page holds a slice of every one."""

    name = "cgopipe-sliced"

    def __init__(self) -> None:
        super().__init__(micro_batches=4, pages=6)


class TokenBudget(CGOPipe):
    """As HRM's policy is taken: micro-batches of 2 requests, a step of decodes alone in
    at least 3 (n_ub 5) of up to 4."""

    name = "cgopipe-tokens"

    def __init__(self) -> None:
        super().__init__(micro_batches=5, micro_batch_size=2, micro_batch_tokens=4)


@pytest.mark.parametrize("policy", [CGOPipe, FourMicroBatches, SlicedPages, TokenBudget,
                                    FlexGen])
def test_cgopipe_and_flexgen_pass_the_whole_suite_with_invariant_8(policy):
    check_scheduler(policy, max_examples=30, real_examples=3)


class PrefetchesEverything(CGOPipe):
    """Broken: loads every layer's pages at once, with no write-after-read edges on them,
    so a page overwrites its buffer half while the layer two back still reads it."""

    name = "prefetches-everything"

    def plan(self, unit, model, cluster):
        graph = super().plan(unit, model, cluster).graph
        edges = tuple(e for e in graph.edges if e.kind != "war"  # the double buffer's
                      or getattr(graph.nodes[e.dst], "payload", None) == "pin")
        return topological_plan(Graph(graph.unit, graph.placement, graph.nodes, edges,
                                      graph.num_layers))


class OverfillsTheRelay(CGOPipe):
    """Broken: copies pages into the pinned relay without waiting for a slot to free (no
    write-after-read edges into its copies), so a slot is refilled while its page is still
    crossing to the GPU."""

    name = "overfills-the-relay"

    def plan(self, unit, model, cluster):
        plan = super().plan(unit, model, cluster)
        g = plan.graph
        edges = tuple(e for e in g.edges if not (
            e.kind == "war" and getattr(g.nodes[e.dst], "payload", None) == "pin"))
        return dataclasses.replace(plan, graph=Graph(g.unit, g.placement, g.nodes, edges,
                                                     g.num_layers))


class IgnoresMemory(CGOPipe):
    """Broken: admits every waiting request whatever the KV cache can hold."""

    name = "cgopipe-ignores-memory"

    def form_units(self, waiting, running, budget):
        roomy = Budget(budget.max_tokens, budget.max_seqs,
                       {d: 10**9 for d in budget.free_kv_blocks}, budget.kv_block_size,
                       budget.units_in_flight)
        return super().form_units(waiting, running, roomy)


def three_layer_case(kv_blocks: int = 64, owners: tuple[int, ...] = (0, 0, 1, 1)) -> Case:
    requests = tuple(SimRequest(0.0, 3, 2) for _ in range(4))
    return Case(ModelCase("qwen3_moe", 3, 4, 2), ClusterCase(("cpu:0", "cpu:1"), owners),
                WorkloadCase(requests, 64, 8, kv_blocks, "uniform", 0))


def test_a_page_that_overwrites_a_layer_in_use_is_caught():
    check_simulated(CGOPipe, three_layer_case(), policy_checks(CGOPipe))  # the real one passes
    with pytest.raises(ConformanceError) as excinfo:
        check_simulated(PrefetchesEverything, three_layer_case(),
                        policy_checks(PrefetchesEverything))
    assert "overwrote its buffer half before layer 0's experts were done" in str(excinfo.value)


def test_a_relay_slot_refilled_before_its_page_has_crossed_is_caught():
    with pytest.raises(ConformanceError) as excinfo:
        check_simulated(OverfillsTheRelay, three_layer_case(),
                        policy_checks(OverfillsTheRelay))
    assert "was copied into its pinned slot before layer" in str(excinfo.value)


def test_a_cgopipe_that_overruns_the_kv_budget_is_caught():
    with pytest.raises(ConformanceError) as excinfo:
        # the host holds 3 experts in every layer, the GPU 1 and a buffer of 2 x 3: both
        # are sized for 1 block of KV beside them, and the KV lives on the host
        check_simulated(IgnoresMemory, three_layer_case(kv_blocks=1, owners=(0, 1, 1, 1)))
    assert "invariant 3 (memory budget)" in str(excinfo.value)


def generate(executor, spec, scheduler, cluster):
    return record_generation(executor, spec, scheduler, cluster, PROMPTS, 5)


def assert_same(run, reference):
    assert_same_generation(run, reference, ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_cgopipe_and_flexgen_match_batch_ep_in_process(family, tiny_factory):
    path = tiny_factory(family)  # 8 experts: 4 resident on cpu:0, 4 paged in from cpu:1
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)

    def inproc():
        return InProcessExecutor(load_workers(path, spec, cluster.placement, torch.float32,
                                              4096), want_logits=True)

    reference = generate(inproc(), spec, BatchEP(), cluster)
    unit = Unit(tuple(SeqChunk(i, 3, 1, "cpu:0") for i in range(5)))
    policy = FourMicroBatches()
    graph = policy.plan(unit, spec, cluster).graph
    pages = [n for n in graph.nodes if isinstance(n, Transfer) and n.payload == "weights"]
    assert {e for p in pages for e in p.experts} == set(cluster.placement.experts_of("cpu:1"))
    assert len({n.seqs for n in graph.nodes if hasattr(n, "seqs")}) == 4  # micro-batches
    sliced = [n for n in SlicedPages().plan(unit, spec, cluster).graph.nodes
              if isinstance(n, Transfer) and n.payload == "weights"]
    first = [p.part for p in sliced if p.layer == sliced[0].layer]
    assert first == [(k, 6) for k in range(6)]  # 4 experts to page: 6 slices of each
    for scheduler in (CGOPipe(), policy, SlicedPages(), FlexGen()):
        assert_same(generate(inproc(), spec, scheduler, cluster), reference)


@pytest.mark.timeout(300)
def test_cgopipe_matches_batch_ep_across_actor_processes(tiny_factory):
    path = tiny_factory("qwen3_moe")
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    reference = generate(InProcessExecutor(load_workers(
        path, spec, cluster.placement, torch.float32, 4096), want_logits=True), spec,
        BatchEP(), cluster)
    with ZmqExecutor(str(path), cluster.placement, "float32", 4096, want_logits=True) as zmq:
        assert_same(generate(zmq, spec, CGOPipe(), cluster), reference)
        assert_same(generate(zmq, spec, SlicedPages(), cluster), reference)  # pages by slices
        assert_same(generate(zmq, spec, FlexGen(), cluster), reference)


def test_the_host_frees_a_finished_requests_kv(tiny_factory):
    path = tiny_factory("qwen3_moe")
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    workers = load_workers(path, spec, cluster.placement, torch.float32, 4096)
    generate(InProcessExecutor(workers, want_logits=True), spec, CGOPipe(), cluster)
    assert not workers["cpu:1"].kv.seqs and not workers["cpu:0"].kv.seqs
    assert not workers["cpu:0"]._units and not workers["cpu:1"]._units


def test_the_readme_cgopipe_examples_run_and_the_trace_has_four_lanes(tiny_factory, tmp_path):
    import json
    import re
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [block] = [b for b in re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
               if "--scheduler cgopipe" in b]
    lines = [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()
             if line.split("#")[0].strip()]
    assert len(lines) == 3
    path = tiny_factory("qwen3_moe")
    for line in lines:
        command = line.replace("/tmp/tiny", str(path)).replace(
            "cgopipe.json", str(tmp_path / "cgopipe.json"))
        argv = shlex.split(command)
        assert argv[0] == "moeflow"
        run = subprocess.run([sys.executable, "-m", "moeflow.cli", *argv[1:]],
                             capture_output=True, text=True, timeout=600,
                             stdin=subprocess.DEVNULL)
        assert run.returncode == 0, (line, run.stderr[-3000:])
        assert run.stdout.strip()
        if "--hardware t4" in line:  # the policy HRM searched, said
            assert re.search(r"HRM's policy on t4 .* μ=\d+", run.stderr), run.stderr
    events = json.loads((tmp_path / "cgopipe.json").read_text())["traceEvents"]
    actors = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    lanes = {f"{actors[e['pid']]}/{e['args']['name']}" for e in events
             if e.get("name") == "thread_name"}
    assert lanes == {"cuda:0/compute", "cuda:0/d2h", "cpu/compute", "cpu/h2d", "cpu/pin"}


def test_the_readme_long_prompt_figures_are_what_the_simulator_prints():
    """The README's long-prompt command, as written: the makespan it states, with the host
    nearly idle (every prompt prefilled on the GPU, only its KV sent over)."""
    import re
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [command] = [" ".join(c.split()) for c in re.findall(r"`(moeflow simulate [^`]*)`", readme)
                 if "--prompt-len fixed:2048" in c]
    stated = re.search(r"attending every prompt and take ([0-9.]+) s now", readme)
    assert stated is not None
    argv = shlex.split(command)
    run = subprocess.run([sys.executable, "-m", "moeflow.cli", *argv[1:]], capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    makespan = re.search(r"makespan\s+([0-9.]+) s", run.stdout)
    host = re.search(r"cpu/compute (\d+)%", run.stdout)
    assert makespan is not None and host is not None, run.stdout
    assert f"{float(makespan.group(1)):.1f}" == stated.group(1)
    assert int(host.group(1)) <= 5


def test_a_gpu_memory_cap_sets_the_resident_experts_and_holds(tiny_factory):
    from moeflow.serve.build import build_engine_core
    from moeflow.serve.config import EngineConfig

    from moeflow.models.tiny import TinyShape

    path = tiny_factory("qwen3_moe", shape=TinyShape(layers=4))  # 8 experts, float32 here
    spec = load_spec(path)
    policy = CGOPipe()
    per_expert = len(spec.moe_layers) * spec.expert_params() * 4
    three = policy.capped_placement(spec, ("cpu:0", "cpu:1"), 4, 1e12)  # room for all 8
    assert three.experts_of("cpu:0") == tuple(range(8))
    # the cap: dense weights, 3 experts resident and the buffer for the other 5
    dense = (spec.total_params() - len(spec.moe_layers) * 8 * spec.expert_params()) * 4
    cap = dense + 3 * per_expert + 2 * 5 * spec.expert_params() * 4
    reference = None
    for scheduler, memory in (("batch-ep", None), ("cgopipe", cap), ("flexgen", cap)):
        core = build_engine_core(EngineConfig(str(path), scheduler, "cpu:0,cpu:1", "float32",
                                              gpu_memory=memory))
        if memory is not None:
            assert core.cluster.placement.experts_of("cpu:0") == (0, 1, 2)
            gpu = core.executor.workers["cpu:0"]
            held = dense + sum(t.numel() * t.element_size() for stack in gpu.experts.values()
                               for t in (stack.gate_up, stack.down))
            assert held + 2 * 5 * spec.expert_params() * 4 <= cap
        tokens = generate(core.executor, spec, core.scheduler, core.cluster)[0]
        reference = reference or tokens
        assert tokens == reference
    with pytest.raises(ValueError, match="too small for cgopipe"):
        build_engine_core(EngineConfig(str(path), "cgopipe", "cpu:0,cpu:1", gpu_memory="100KB"))
    with pytest.raises(ValueError, match="not batch-ep"):
        build_engine_core(EngineConfig(str(path), "batch-ep", "cpu:0,cpu:1", gpu_memory="1GB"))
    with pytest.raises(ValueError, match="not a memory size"):
        EngineConfig(str(path), "cgopipe", "cpu:0,cpu:1", gpu_memory="lots")


def test_cgopipe_named_with_hardware_takes_hrms_policy(tiny_factory, caplog):
    """EngineConfig(hardware=...): HRM searches cgopipe's policy on that machine, the GPU's
    memory the cap; the engine runs with its micro-batch size and gives batch-ep's
    tokens. Another scheduler with hardware is refused."""
    import logging

    from moeflow.models.tiny import TinyShape
    from moeflow.serve.build import build_engine_core
    from moeflow.serve.config import EngineConfig
    from moeflow.sim import hrm
    from moeflow.sim.hrm_search import search, with_gpu_memory

    path = tiny_factory("qwen3_moe", shape=TinyShape(layers=4))
    spec = load_spec(path)
    cap = 1_000_000  # 2 of 8 experts resident
    embed_and_head = 2 * spec.vocab_size * spec.hidden_size * 4  # HRM leaves them out
    want = search(spec, with_gpu_memory(hrm.PRESETS["t4"], cap - embed_and_head),
                  hrm.Workload(5, 6), placements=((False, True),), max_batch=4).policy
    assert want.micro_batch_size < 4  # the prompts run in several micro-batches
    with caplog.at_level(logging.INFO, logger="moeflow.policy"):
        core = build_engine_core(EngineConfig(str(path), "cgopipe", "cpu:0,cpu:1", "float32",
                                              gpu_memory=cap, hardware="t4",
                                              lengths="5:6", max_seqs=4))
    assert type(core.scheduler) is CGOPipe
    # micro-batches of μ; a step of decodes alone in up to μ prompts' tokens each
    assert core.scheduler.micro_batch_size == want.micro_batch_size
    assert core.scheduler.micro_batch_tokens == want.micro_batch_size * 5
    assert core.scheduler.micro_batches == want.num_micro_batches
    assert f"N={want.batch_size} μ={want.micro_batch_size}" in caplog.text
    assert f"micro-batches of {want.micro_batch_size}, a step of decodes" in caplog.text
    assert core.cluster.placement.experts_of("cpu:1")  # paged: the cap holds
    tokens = generate(core.executor, spec, core.scheduler, core.cluster)[0]
    reference = build_engine_core(EngineConfig(str(path), "batch-ep", "cpu:0,cpu:1",
                                               "float32"))
    assert tokens == generate(reference.executor, spec, reference.scheduler,
                              reference.cluster)[0]
    for scheduler, memory in (("batch-ep", None), ("flexgen", cap),
                              (CGOPipe(micro_batch_size=2), cap)):
        with pytest.raises(ValueError, match="hardware is what cgopipe's policy search"):
            build_engine_core(EngineConfig(str(path), scheduler, "cpu:0,cpu:1", "float32",
                                           gpu_memory=memory, hardware="t4"))
    with pytest.raises(ValueError, match="unknown hardware 'h99'"):
        build_engine_core(EngineConfig(str(path), "cgopipe", "cpu:0,cpu:1", "float32",
                                       gpu_memory=cap, hardware="h99"))
