"""Bad input gets a clear error where it enters, and leaves nothing behind: sampling
parameters, the command line's arguments, simulated workloads, the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
import torch

from moeflow.cli import main as cli_main
from moeflow.ops.sampling import SamplingParams
from moeflow.sim.workload import Lengths, Routing, WorkloadError, requests
from moeflow.units import parse_bytes

SIM = ["simulate", "--model", "mixtral-8x7b", "--hardware", "h100x8", "--num-requests", "2"]


@pytest.mark.parametrize("fields, error, match", [
    ({"seed": 1 << 64}, ValueError, "seed must be in"),
    ({"seed": -1}, ValueError, "seed must be in"),
    ({"seed": "x"}, TypeError, "seed must be an integer"),
    ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an integer"),
    ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an integer"),
    ({"top_k": 2.5}, TypeError, "top_k must be an integer"),
    ({"logprobs": True}, TypeError, "logprobs must be an integer"),
    ({"temperature": "1"}, TypeError, "temperature must be a number"),
    ({"top_p": None}, TypeError, "top_p must be a number"),
    ({"ignore_eos": "no"}, TypeError, "ignore_eos must be a bool"),
    ({"stop": [1]}, TypeError, "stop must be a string or strings"),
    ({"stop": ""}, ValueError, "non-empty"),
    ({"stop_token_ids": [-1]}, ValueError, "stop_token_ids must be >= 0"),
    ({"stop_token_ids": [1.5]}, TypeError, "stop_token_ids must be an integer"),
])
def test_sampling_params_refuse_bad_values_when_made(fields, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**fields)


def test_sampling_params_take_a_stop_string_whole_and_numpy_integers():
    assert SamplingParams(stop="ab").stop == ("ab",)
    assert SamplingParams(stop=["ab", "c"]).stop == ("ab", "c")
    params = SamplingParams(seed=numpy.int64(7), max_new_tokens=numpy.int32(3),
                            temperature=numpy.float32(0.5), stop_token_ids=[numpy.int64(2)])
    assert params.seed == 7 and params.max_new_tokens == 3
    assert SamplingParams(seed=(1 << 64) - 1).seed == (1 << 64) - 1


def test_an_actor_fails_the_unit_of_bad_sampling_fields_and_keeps_nothing():
    """The front ends check sampling fields; an actor handed bad ones anyway fails that unit
    (it once raised out of the actor and took the engine down) and reserves nothing."""
    from moeflow.actors.core import COORDINATOR, ActorCore
    from moeflow.actors.messages import NodeFailed, RunUnit
    from moeflow.actors.null import NullWorker
    from moeflow.dataflow import Cut, Placement, SeqChunk, Unit, compile
    from moeflow.models.families import spec_from_config
    from moeflow.models.tiny import tiny_config
    from moeflow.scheduler import topological_plan

    spec = spec_from_config(tiny_config("qwen3_moe"))
    unit = Unit((SeqChunk(0, 0, 3, "cpu:0"),))
    plan = topological_plan(compile(spec, unit, Placement.sharded(("cpu:0",), 8), Cut()))
    core = ActorCore("cpu:0", NullWorker("cpu:0", spec))
    [out] = core.handle(RunUnit(3, plan, {0: [1, 2, 3]}, {0: {"seed": 1 << 64}}))
    assert out.to == COORDINATOR and isinstance(out.msg, NodeFailed)
    assert "seed" in out.msg.error
    assert not core.units and not core.execution.plans and not core.samplers


@pytest.mark.parametrize("args, match", [
    (["--workload", "poisson:rate=nan"], "poisson rate must be finite"),
    (["--workload", "poisson:rate=inf"], "poisson rate must be finite"),
    (["--prompt-len", "lognormal:inf,1"], "bad length distribution"),
    (["--prompt-len", "lognormal:0,1"], "bad length distribution"),
    (["--prompt-len", "lognormal:100,nan"], "bad length distribution"),
    (["--prompt-len", "fixed:0"], "bad length distribution"),
    (["--output-len", "fixed:-3"], "bad length distribution"),
    (["--output-len", "uniform:0-4"], "bad length distribution"),
    (["--routing", "zipf:s=nan"], "zipf's exponent"),
    (["--routing", "zipf:s=1e400"], "zipf's exponent"),
    (["--routing", "zipf:s=abc"], "zipf's exponent"),
    (["--workload", "trace:/"], "cannot read the trace"),
    # a parameter the parser does not know is refused, not dropped for a default
    (["--routing", "zipf:1.5"], "bad parameter '1.5' in 'zipf:1.5'"),
    (["--routing", "zipf:s=2,t=1"], "bad parameter 't=1'"),
    (["--routing", "uniform:s=2"], "uniform routing takes no parameters"),
    (["--workload", "poisson:rate=4,burst"], "bad parameter 'burst'"),
    (["--workload", "poisson:rate=4,seed=1"], "bad parameter 'seed=1'"),
    (["--workload", "burst:rate=3"], "burst arrivals take no parameters"),
    (["--hardware", "/"], "/: cannot read a hardware description"),
])
def test_simulate_refuses_bad_workloads_in_one_line(args, match, capsys):
    assert cli_main([*SIM, *args]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("line, match", [
    ('{"arrival": 0, "output": 0}', "whole tokens, >= 1"),
    ('{"arrival": -1}', "arrival must be finite"),
    ('{"arrival": NaN}', "arrival must be finite"),
    ('{"arrival": 0, "prompt": "x"}', "bad trace line"),
    ('{"arrival": 0, "prompt": 3.7}', "whole tokens"),
    ('{"arrival": 0, "output": true}', "whole tokens"),
])
def test_a_trace_line_out_of_range_is_refused(tmp_path, line, match):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival": 0.5, "prompt": 4, "output": 2}\n' + line + "\n")
    with pytest.raises(WorkloadError, match=match):
        requests(f"trace:{trace}", 0, Lengths.parse("fixed:4"), Lengths.parse("fixed:2"))
    trace.write_text("\n")
    with pytest.raises(WorkloadError, match="no requests"):
        requests(f"trace:{trace}", 0, Lengths.parse("fixed:4"), Lengths.parse("fixed:2"))
    trace.write_text('{"arrival": 0.5}\n')  # lengths absent: drawn
    [req] = requests(f"trace:{trace}", 0, Lengths.parse("fixed:4"), Lengths.parse("fixed:2"))
    assert (req.prompt, req.output) == (4, 2)
    # Unix timestamps: time counts from the first arrival, to the microsecond
    trace.write_text('{"arrival": 1764979200.25}\n{"arrival": 1764979200.250003}\n')
    reqs = requests(f"trace:{trace}", 0, Lengths.parse("fixed:4"), Lengths.parse("fixed:2"))
    assert reqs[0].arrival == 0 and reqs[1].arrival == pytest.approx(3e-6, rel=1e-3)


def test_a_routing_recording_of_another_model_is_refused(tmp_path):
    rec = tmp_path / "routing.json"
    rec.write_text(json.dumps({"layers": {"0": [1, 2, 3, 4], "1": [4, 3, 2, 1]}}))
    assert Routing.parse(f"recorded:{rec}", 4, 1, 2, moe_layers=[0, 1]).weights[1][0] == 4
    with pytest.raises(WorkloadError, match="records layers 0-1; the model routes in "
                                            "layers 0-31"):
        Routing.parse(f"recorded:{rec}", 4, 1, 32)
    with pytest.raises(WorkloadError, match="routes in layers 1-2"):
        Routing.parse(f"recorded:{rec}", 4, 1, 3, moe_layers=[1, 2])


def test_simulate_says_when_requests_run_past_the_context(capsys):
    assert cli_main([*SIM, "--prompt-len", "fixed:40000", "--output-len", "fixed:2"]) == 0
    assert "2 of 2 requests run past the model's context of 32,768 tokens" in (
        capsys.readouterr().out)


def test_memory_sizes_take_plain_bytes_and_refuse_the_rest():
    assert parse_bytes("1048576") == parse_bytes("1MiB") == 1 << 20
    assert parse_bytes(" 2 GB ") == 2e9 and parse_bytes(512) == 512.0
    for bad in ("12XB", "", "GB", float("nan"), float("inf"), True, None):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_bytes(bad)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_devices_on_a_machine_without_cuda_are_a_clear_error(tiny_factory, capsys):
    from moeflow.serve.config import EngineConfig

    with pytest.raises(ValueError, match="cuda:0 needs CUDA, which this machine lacks"):
        EngineConfig("unused", devices="cpu:0,cuda:0")
    path = tiny_factory("qwen3_moe")
    assert cli_main(["generate", str(path), "--prompt-ids", "1,2", "--devices", "cuda:0"]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_generate_says_when_the_request_failed_and_exits_nonzero(tiny_factory, monkeypatch,
                                                                 capsys):
    import moeflow.serve.llm as llm_module

    path = tiny_factory("qwen3_moe")
    real = llm_module.LLM.generate

    def failing(self, prompts, *args, **kwargs):  # the engine ends the request in error
        [out] = real(self, prompts, *args, **kwargs)
        return [llm_module.Completion(out.request_id, out.prompt_token_ids, out.token_ids[:1],
                                      "", "error: the device failed", out.ttft_s, out.e2e_s)]

    monkeypatch.setattr(llm_module.LLM, "generate", failing)
    assert cli_main(["generate", str(path), "--prompt-ids", "1,2,3",
                     "--max-new-tokens", "2"]) == 1
    assert "error: the device failed" in capsys.readouterr().err


@pytest.mark.parametrize("ids", ["1,,2", "1,2,", ",", "1,x"])
def test_generate_refuses_malformed_prompt_ids(tiny_factory, ids, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["generate", str(tiny_factory("qwen3_moe")), "--prompt-ids", ids])
    assert exit_.value.code == 2 and "comma-separated integers" in capsys.readouterr().err


def test_calibrate_checks_where_it_writes_before_it_measures(tmp_path, capsys):
    for out, match in ((tmp_path / "no" / "x.json", "no directory"),
                       (tmp_path, "is a directory")):
        assert cli_main(["calibrate", "--quick", "--out", str(out)]) == 2
        assert match in capsys.readouterr().err


def test_make_tiny_refuses_a_file_and_leaves_nothing_for_a_bad_shape(tmp_path, capsys):
    existing = tmp_path / "config.json"
    existing.write_text("{}")
    assert cli_main(["make-tiny", "qwen3_moe", str(existing)]) == 2
    assert "not a directory" in capsys.readouterr().err
    out = tmp_path / "bad"
    assert cli_main(["make-tiny", "qwen3_moe", str(out), "--experts", "1"]) == 2
    assert not out.exists()


def test_llm_withdraws_what_it_admitted_when_a_prompt_is_refused(tiny_factory):
    """A batch whose third prompt the engine refuses withdraws the two it admitted."""
    import time

    from moeflow.serve.llm import LLM

    with LLM(str(tiny_factory("qwen3_moe")), max_waiting=2) as llm:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate([[1, 2], [3, 4], [10**9]], max_new_tokens=2000)
        deadline = time.monotonic() + 60
        while llm._async.num_active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert llm._async.num_active == 0 and not llm._async._streams
        assert len(llm.generate([1, 2], max_new_tokens=2)[0].token_ids) == 2
        for bad in (None, 5):
            with pytest.raises(TypeError, match="prompts must be"):
                llm.generate(bad)  # type: ignore[arg-type]


def test_a_bench_summary_says_why_requests_failed():
    from moeflow.serve.bench import Record, format_summary, summarize

    records = [Record(0, 0.0, 5, 2), Record(1, 0.0, 5, 2), Record(2, 0.0, 5, 2)]
    records[0].error = records[1].error = "prompt_too_long: 5000 tokens"
    records[2].error = "not finished"
    summary = summarize(records, 1.0)
    assert summary["errors"] == {"prompt_too_long: 5000 tokens": 2, "not finished": 1}
    text = format_summary(summary)
    assert "error x2: prompt_too_long: 5000 tokens" in text and "error x1: not finished" in text


def test_a_zmq_bind_that_is_no_endpoint_says_so():
    from moeflow.serve.security import SecurityError, check_bind

    for address in ("garbage", "tcp://127.0.0.1", "udp://127.0.0.1:5", "tcp://127.0.0.1:x"):
        with pytest.raises(ValueError, match="not a zmq endpoint") as info:
            check_bind(address, curve=False)
        assert not isinstance(info.value, SecurityError)
    check_bind("tcp://127.0.0.1:5555", curve=False)
    check_bind("ipc:///tmp/x.sock", curve=False)
    with pytest.raises(SecurityError, match="reachable from other machines"):
        check_bind("tcp://0.0.0.0:5555", curve=False)


def test_what_the_solver_prints_reaches_neither_stdout_nor_stderr(capfd):
    """HiGHS may printf a debug line mid-search; stdout carries `plan`'s report and
    `generate --json`'s object, and the line means nothing to a user: it is dropped."""
    import ctypes
    import os

    from moeflow.sim.hrm_search import solver_output_discarded

    libc = ctypes.CDLL(None)
    print("before", flush=True)
    with solver_output_discarded():
        libc.printf(b"from C\n")  # buffered by C's stdio, as HiGHS's printf is
        os.write(1, b"from fd 1\n")
    print("after", flush=True)
    out, err = capfd.readouterr()
    assert out.split() == ["before", "after"]
    assert "from C" not in err and "from fd 1" not in err


def test_a_kv_cache_smaller_than_the_context_bounds_requests(tiny_factory, capsys):
    """A device's KV cache below the model's context is the engine's context: a longer
    prompt is refused, generation ends there with `length`, and a request never spins
    being evicted and readmitted (it once did, blocking every other request)."""
    import asyncio

    from moeflow.serve.async_engine import AsyncEngine
    from moeflow.serve.events import FinalEvent

    path = str(tiny_factory("qwen3_moe"))
    prompt = ",".join(map(str, range(1, 61)))
    assert cli_main(["generate", path, "--prompt-ids", prompt, "--max-new-tokens", "20",
                     "--kv-cache-tokens", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 4 and out["finish_reason"] == "length"  # 60 + 4 = 64
    long = ",".join(map(str, range(1, 71)))
    assert cli_main(["generate", path, "--prompt-ids", long, "--kv-cache-tokens", "64"]) == 2
    assert "a device's KV cache (kv_cache_tokens) holds 64" in capsys.readouterr().err

    async def main() -> None:
        async with AsyncEngine.from_pretrained(path, devices="cpu:0,cpu:1",
                                               kv_cache_tokens=64) as engine:
            assert engine.context == 64
            with pytest.raises(ValueError, match="KV cache"):
                await engine.add(list(range(1, 71)), SamplingParams(max_new_tokens=5))
            async with asyncio.timeout(60):
                finals = [e async for e in engine.generate(list(range(1, 61)),
                                                           SamplingParams(max_new_tokens=20))
                          if isinstance(e, FinalEvent)]
                assert finals[0].finish_reason == "length"
                assert finals[0].completion_tokens == 4
                others = [e async for e in engine.generate([1, 2, 3],
                                                           SamplingParams(max_new_tokens=3))]
                assert others[-1].completion_tokens == 3

    asyncio.run(main())


def test_a_seeded_request_draws_the_same_tokens_when_preempted(tiny_factory):
    """Each token's draw depends on the seed and its position alone: a request evicted
    and recomputed (on a fresh generator) samples what it samples alone."""
    from moeflow.serve.llm import LLM

    path = str(tiny_factory("qwen3_moe"))
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7)
    target, others = list(range(300, 340)), [list(range(5, 45)), list(range(50, 90))]
    with LLM(path, devices="cpu:0") as llm:
        [alone] = llm.generate([target], sampling=params)
    with LLM(path, devices="cpu:0", kv_cache_tokens=112) as llm:  # 7 blocks for 3
        evicted = []
        preempt = llm.engine.book.preempt

        def counting(seq_id: int) -> None:
            evicted.append(seq_id)
            preempt(seq_id)

        llm.engine.book.preempt = counting  # type: ignore[method-assign]
        assert llm.generate(others + [target], sampling=params)[-1].token_ids == \
            alone.token_ids
    assert evicted, "the KV cache was meant to force a preemption"


def test_a_simulated_request_that_outgrows_the_kv_cache_is_an_error_not_a_hang():
    from moeflow.scheduler import BatchEP
    from moeflow.sim import hardware, models
    from moeflow.sim.simulator import SimulationError, Simulator
    from moeflow.sim.workload import SimRequest

    spec = models.load("mixtral-8x7b")
    sim = Simulator(spec, hardware.load("h100x8"), BatchEP(),
                    Routing.parse("uniform", 8, 2, spec.num_layers), kv_block_size=16)
    sim.kv_blocks = {d: 4 for d in sim.kv_blocks}  # 64 tokens a device
    assert sim.run([SimRequest(0.0, 40, 20)]).metrics.throughput > 0
    with pytest.raises(SimulationError, match="outgrew the KV cache of its device alone "
                                              r"\(64 tokens\)"):
        sim.run([SimRequest(0.0, 40, 40)])


def test_an_interrupted_llm_generate_aborts_its_requests(tiny_factory):
    """Ctrl-C (or a timeout) in LLM.generate stops the work it started: the requests are
    aborted, not left running to their max_new_tokens behind later calls."""
    import time

    from moeflow.serve.llm import LLM

    with LLM(str(tiny_factory("qwen3_moe")), devices="cpu:0") as llm:
        batch = [[1, 2, 3, i] for i in range(8)]
        with pytest.raises(TimeoutError):
            llm._loop.run(llm._generate_all(batch, SamplingParams(max_new_tokens=1900,
                                                                  ignore_eos=True)),
                          timeout=0.3)
        deadline = time.monotonic() + 30
        while (llm.engine.requests or llm._async._streams) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not llm.engine.requests and not llm._async._streams
        assert len(llm.generate([1, 2, 3], max_new_tokens=3)[0].token_ids) == 3


def test_closing_while_an_actor_restarts_does_not_wait_out_its_shutdown(tiny_factory):
    import os
    import signal
    import time

    from moeflow.serve.llm import LLM

    llm = LLM(str(tiny_factory("qwen3_moe")), devices="cpu:0,cpu:1", transport="zmq")
    try:
        llm.generate([[1, 2, 3]], max_new_tokens=2)
        os.kill(llm.executor.actors["cpu:1"].proc.pid, signal.SIGKILL)
        time.sleep(0.6)  # found dead, a new one starting: no socket for a Shutdown yet
    finally:
        start = time.monotonic()
        llm.close()
    assert time.monotonic() - start < 4  # it waited the full 5 s for the starting one


def test_simulate_writes_json_without_nan_and_checks_where_first(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert cli_main([*SIM, "--output-len", "fixed:1", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert metrics["metrics"]["tpot"]["p50"] is None  # one token: no time per token
    capsys.readouterr()
    assert cli_main([*SIM, "--json", str(tmp_path / "no" / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "no directory" in err and "simulating" not in err


def test_simulating_an_offloading_policy_on_other_hardware_is_refused_first(capsys):
    assert cli_main(["simulate", "--model", "mixtral-8x7b", "--hardware", "h100x8",
                     "--scheduler", "cgopipe", "--num-requests", "2"]) == 2
    err = capsys.readouterr().err
    assert "cgopipe is simulated on one GPU and its host" in err and "HRM" not in err


def test_sigterm_stops_a_simulation_as_ctrl_c_does(tmp_path):
    """The trace in progress is removed (a .part file was left), the exit status says
    SIGTERM."""
    import signal
    import subprocess
    import sys
    import time

    trace = tmp_path / "o.json"
    proc = subprocess.Popen([sys.executable, "-m", "moeflow", "simulate", "--model",
                             "mixtral-8x7b", "--hardware", "h100x8", "--workload",
                             "poisson:rate=20", "--num-requests", "2000", "--trace",
                             str(trace)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not trace.with_suffix(".json.part").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    assert not trace.exists() and not trace.with_suffix(".json.part").exists()


def test_a_bad_checkpoint_over_actor_processes_is_a_one_line_error(tmp_path, capsys):
    """--transport zmq: the actors open the weights, yet a missing shard is the same
    one-line error (exit 2) as in process, and a tensor of the wrong shape names the
    actor whose error it printed, with no traceback."""
    import shutil

    from moeflow.models.tiny import make_tiny

    good = make_tiny("qwen3_moe", tmp_path / "good", shards=3)
    missing = Path(shutil.copytree(good, tmp_path / "missing"))
    (missing / "model-00002-of-00003.safetensors").unlink()
    shaped = Path(shutil.copytree(good, tmp_path / "shaped"))
    config = json.loads((shaped / "config.json").read_text())
    config["moe_intermediate_size"] *= 2
    (shaped / "config.json").write_text(json.dumps(config))
    args = ["--prompt-ids", "1,2", "--max-new-tokens", "2", "--devices", "cpu:0,cpu:1",
            "--transport", "zmq"]
    assert cli_main(["generate", str(missing), *args]) == 2
    err = capsys.readouterr().err
    assert "model-00002-of-00003.safetensors: file not found" in err
    assert "Traceback" not in err
    assert cli_main(["generate", str(shaped), *args]) == 2
    err = capsys.readouterr().err
    assert "could not load what it was given" in err and "Traceback" not in err


def test_a_simulated_request_that_outgrows_its_kv_cache_is_a_one_line_error(tmp_path, capsys):
    """The run stops with the simulator's reason, exit 2, and leaves no trace behind."""
    trace = tmp_path / "kv.json"
    assert cli_main(["simulate", "--model", "olmoe-1b-7b", "--hardware", "l4",
                     "--num-requests", "1", "--workload", "burst", "--prompt-len",
                     "fixed:3000000", "--output-len", "fixed:2", "--trace", str(trace)]) == 2
    err = capsys.readouterr().err
    assert "outgrew the KV cache of its device alone" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [
    [*SIM, "--trace", "{file}/t.json"],
    [*SIM, "--trace", "{file}/t.html"],  # an .html timeline is written at the end only
    ["graph", "{tiny}", "--out", "{file}/g.dot"],
    ["make-tiny", "qwen3_moe", "{file}/tiny"],
])
def test_a_path_that_cannot_be_written_is_a_one_line_error_before_any_work(
        command, tiny_factory, tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("")
    tiny = tiny_factory("qwen3_moe") if command[0] == "graph" else ""
    assert cli_main([a.format(file=file, tiny=tiny) for a in command]) == 2
    err = capsys.readouterr().err
    assert str(file) in err and "Traceback" not in err and "simulating" not in err
    assert len(err.strip().splitlines()) == 1


def test_make_tiny_writes_weights_as_readable_as_its_other_files(tmp_path):
    import os

    from moeflow.models.tiny import TinyShape, make_tiny

    out = make_tiny("qwen3_moe", tmp_path / "t", TinyShape(layers=1, experts=2))
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes
    assert modes["model.safetensors"] & 0o044 == 0o044 & ~os.umask(os.umask(0))


def test_make_tiny_refuses_a_vocabulary_its_tokenizer_overflows(tmp_path, capsys):
    out = tmp_path / "small"
    assert cli_main(["make-tiny", "qwen3_moe", str(out), "--vocab", "100"]) == 2
    assert "--vocab >= 258" in capsys.readouterr().err and not out.exists()
    assert cli_main(["make-tiny", "qwen3_moe", str(out), "--vocab", "100",
                     "--no-tokenizer"]) == 0
    # a shape MXFP4 cannot pack fails after the directory was made: it is removed again
    packed = tmp_path / "mxfp4"
    assert cli_main(["make-tiny", "gpt_oss", str(packed), "--mxfp4", "--intermediate",
                     "7"]) == 2
    assert not packed.exists()


def test_a_burst_shows_progress_in_tokens_as_it_runs(capsys):
    """Under a burst every request finishes near the end: progress counts output tokens."""
    assert cli_main(["simulate", "--model", "olmoe-1b-7b", "--hardware", "h100x8",
                     "--workload", "burst", "--num-requests", "4", "--prompt-len",
                     "fixed:64", "--output-len", "fixed:20"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("simulating")]
    assert len(lines) >= 5 and lines[-1].startswith("simulating (output tokens): 80/80")


@pytest.mark.parametrize("script, args", [
    ("eps.py", ["--quick"]),
    ("cgopipe.py", ["--only", "sim"]),
    ("engine.py", ["--only", "sim"]),
])
def test_a_benchmark_checks_its_json_path_before_it_runs(script, args, tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / script), *args,
                           "--json", str(tmp_path / "no" / "out.json")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "no directory" in done.stderr
    assert "Traceback" not in done.stderr and not done.stdout
