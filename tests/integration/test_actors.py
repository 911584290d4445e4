"""Actor processes over ZeroMQ: the same results as the in-process transport, faults that
fail cleanly and recover, and no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from moeflow.actors.coordinator import ZmqExecutor
from moeflow.actors.inproc import InProcessExecutor, load_workers
from moeflow.models.families import load_spec
from moeflow.scheduler import BatchEP, Cluster
from moeflow.serve.llm import LLM
from moeflow.ops.sampling import SamplingParams
from moeflow.testing.conformance import record_generation

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
            "gpt_oss")
PROMPTS = [[5, 17, 33, 2, 99, 250, 7], [8, 9, 10], [300, 301, 302, 303, 304, 305, 306, 40, 41]]
STEPS = 8


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it has exited
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("num_actors", [2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_actor_processes_match_the_in_process_executor(family, num_actors, tiny_factory):
    path = tiny_factory(family)
    spec = load_spec(path)
    devices = tuple(f"cpu:{i}" for i in range(num_actors))
    cluster = Cluster.sharded(devices, spec.moe.num_experts)
    inproc = InProcessExecutor(load_workers(path, spec, cluster.placement, torch.float32, 4096),
                               want_logits=True)
    ref_tokens, ref_logits = record_generation(inproc, spec, BatchEP(), cluster, PROMPTS, STEPS)
    with ZmqExecutor(str(path), cluster.placement, "float32", 4096, want_logits=True) as zmq:
        pids = list(zmq.pids().values())
        tokens, logits = record_generation(zmq, spec, BatchEP(), cluster, PROMPTS, STEPS)
    assert tokens == ref_tokens
    for request, rows in ref_logits.items():
        assert len(logits[request]) == len(rows) == STEPS
        for a, b in zip(logits[request], rows):
            assert (a - b).abs().max() <= 1e-5
    assert not any(alive(p) for p in pids)


def long_generation(llm, prompt, out):
    out["completions"] = llm.generate(prompt, sampling=SamplingParams(
        max_new_tokens=LONG, ignore_eos=True))


LONG = 300


@pytest.mark.timeout(180)
@pytest.mark.parametrize("victim", ["cpu:1", "cpu:0"])  # an expert owner, then the home
def test_a_killed_actors_request_runs_again_and_completes_as_if_nothing_happened(
        victim, tiny_factory):
    path = tiny_factory("qwen3_moe")
    with LLM(path, devices="cpu:0,cpu:1") as reference:
        expected = reference.generate([1, 2, 3], max_new_tokens=LONG)[0]
    with LLM(path, devices="cpu:0,cpu:1", transport="zmq") as llm:
        before = llm.executor.pids()
        out: dict[str, object] = {}
        worker = threading.Thread(target=long_generation, args=(llm, [1, 2, 3], out))
        worker.start()
        deadline = time.monotonic() + 60
        while not any(r.output_ids for r in llm.engine.requests.values()):
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.01)
        os.kill(before[victim], signal.SIGKILL)
        worker.join(timeout=90)
        assert not worker.is_alive(), "the request hung after an actor died"
        [done] = out["completions"]  # type: ignore[misc]
        assert done.finish_reason == "length" and done.token_ids == expected.token_ids
        after = llm.executor.pids()
        assert after[victim] != before[victim]
        assert f"actor {victim} died" in llm.executor.last_restart
    for pid in [*before.values(), *after.values()]:
        assert not alive(pid)


SCRIPT = """
import sys
from moeflow.serve.llm import LLM
from moeflow.ops.sampling import SamplingParams
llm = LLM(sys.argv[1], devices="cpu:0,cpu:1", transport="zmq")
print("ready", flush=True)
with llm:
    llm.generate([1, 2, 3], sampling=SamplingParams(max_new_tokens=100000, ignore_eos=True))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_no_actor_process_outlives_its_parent(how, tiny_factory):
    """Ctrl-C shuts the actors down; a parent killed outright takes them with it."""
    path = tiny_factory("qwen3_moe")
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT, str(path)], stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout.readline().strip() == "ready"
    time.sleep(1.0)  # generating
    actors = children_of(parent.pid)
    assert len(actors) == 2 and all(alive(p) for p in actors)
    parent.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(alive(p) for p in actors):
        assert time.monotonic() < deadline, f"actors {actors} outlived their parent"
        time.sleep(0.05)


CTRL_C_SCRIPT = """
import sys
from moeflow.serve.llm import LLM
from moeflow.ops.sampling import SamplingParams
with LLM(sys.argv[1], devices="cpu:0,cpu:1", transport="zmq") as llm:
    print("ready", flush=True)
    try:
        llm.generate([1, 2, 3], sampling=SamplingParams(max_new_tokens=100000, ignore_eos=True))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    [out] = llm.generate([1, 2, 3], sampling=SamplingParams(max_new_tokens=4, ignore_eos=True))
    print("tokens", len(out.token_ids), "restarts", llm._async.health()["actor_restarts"])
"""


@pytest.mark.timeout(120)
def test_ctrl_c_in_a_terminal_interrupts_the_call_not_the_actors(tiny_factory):
    """A terminal's Ctrl-C signals the whole process group: the call is interrupted, and
    the actors, which share the group, carry on (none restarted, the next call served)."""
    path = tiny_factory("qwen3_moe")
    parent = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, str(path)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # generating
        os.killpg(parent.pid, signal.SIGINT)
        out, _ = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    assert parent.returncode == 0
    assert out.split() == ["interrupted", "tokens", "4", "restarts", "0"]


@pytest.mark.timeout(120)
def test_cli_generate_over_zmq(tiny_factory, capsys):
    from moeflow.cli import main

    path = tiny_factory("mixtral")
    expected = LLM(path, devices="cpu:0,cpu:1").generate([5, 6, 7], max_new_tokens=5)[0]
    assert main(["generate", str(path), "--prompt-ids", "5,6,7", "--max-new-tokens", "5",
                 "--devices", "cpu:0,cpu:1", "--transport", "zmq", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["token_ids"] == list(expected.token_ids)


@pytest.mark.timeout(300)
def test_gates_report_their_counts_only_to_a_coordinator_that_records_them(tiny_factory):
    path = tiny_factory("qwen3_moe")
    spec = load_spec(path)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    workers = load_workers(path, spec, cluster.placement, torch.float32, 4096)
    recorded = {}
    for record in (False, True):
        inproc = InProcessExecutor(workers, record_routing=record)
        replies = []
        take = inproc._to_coordinator
        inproc._to_coordinator = lambda out: (replies.append(type(out.msg).__name__),
                                              take(out))[1]
        record_generation(inproc, spec, BatchEP(), cluster, PROMPTS, STEPS)
        assert ("RoutingCounts" in replies) == record  # a message a gate, only when asked
        recorded[record] = inproc.routing
    assert recorded[False] is None
    tokens = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (STEPS - 1)  # prompts, fed back
    assert sorted(recorded[True]) == list(range(spec.num_layers))
    assert all(sum(c) == tokens * spec.moe.top_k for c in recorded[True].values())
    with ZmqExecutor(str(path), cluster.placement, "float32", 4096, record_routing=True) as zmq:
        record_generation(zmq, spec, BatchEP(), cluster, PROMPTS, STEPS)
        assert zmq.routing == recorded[True]


@pytest.mark.timeout(120)
def test_actors_bound_onednns_cache_of_compiled_gemms(tiny_factory, monkeypatch):
    """oneDNN keeps a compiled GEMM per shape, 1,024 by default (~0.4 MB each): a server's
    actors, meeting a new shape with most prompts, start with a smaller bound, unless the
    environment sets one."""
    from moeflow.ops.onednn_cache import ONEDNN_CACHE_ENTRIES, ONEDNN_CACHE_VAR

    def actor_values(llm: LLM) -> list[str]:
        values = []
        for pid in children_of(os.getpid()):
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            if any(b"moeflow.actors.process" in part
                   for part in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")):
                values += [v.split(b"=", 1)[1].decode() for v in environ
                           if v.startswith(ONEDNN_CACHE_VAR.encode() + b"=")]
        return values

    path = tiny_factory("qwen3_moe")
    monkeypatch.delenv(ONEDNN_CACHE_VAR, raising=False)
    with LLM(path, devices="cpu:0,cpu:1", transport="zmq") as llm:
        assert actor_values(llm) == [str(ONEDNN_CACHE_ENTRIES)] * 2
    monkeypatch.setenv(ONEDNN_CACHE_VAR, "7")
    with LLM(path, devices="cpu:0,cpu:1", transport="zmq") as llm:
        assert actor_values(llm) == ["7"] * 2
