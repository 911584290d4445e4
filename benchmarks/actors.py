"""The actor runtime's cost, measured side by side in one run.

1. Per transfer, against raw pyzmq. Two processes on this machine, PUSH/PULL both ways:
     raw       the echo process forwards the received frames as they are
     moeflow   every hop goes through the runtime's data path: a Data message with a
               tensor payload is encoded (msgpack header + zero-copy frame), decoded, turned
               into the worker's value and back into a payload, and re-encoded
     curve     the same, over CURVE-encrypted sockets, as the actor plane runs
   for payloads of 4 KiB, 1 MiB and 64 MiB: the median round trip, the throughput, and
   the ratios moeflow / raw (the runtime's overhead per transfer) and curve / raw.

2. Decode tokens/s of the benchmark checkpoint with 2 actor processes over ZeroMQ against
   the same 2 devices in process (batch 1 and batch 16).

3. Fault detection on a 2-actor cluster (a tiny checkpoint): how long after an actor is
   SIGKILLed or SIGSTOPped its running request is found to have lost it, to run again
   once the actor is back (median over --fault-tries), and
   that a 512-token prefill (on the benchmark checkpoint if there is one) raises no false
   alarm: no failed job, no restarted actor, nothing dropped. Exits 1 on a false alarm.

    python benchmarks/actors.py [--json out.json] [--skip-decode] [--skip-faults]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import zmq

from moeflow.actors.messages import Data, decode, encode
from moeflow.actors.plane import Gatekeeper, KeyPair, connect_curve, serve_curve
from moeflow.actors.values import Partial, from_payload, to_payload

SIZES = {"4KiB": 4 << 10, "1MiB": 1 << 20, "64MiB": 64 << 20}


def message(nbytes: int) -> Data:
    rows = max(1, nbytes // (1024 * 2))
    y = torch.ones(rows, 1024, dtype=torch.bfloat16)
    return Data(1, 2, to_payload(Partial(0, y)))


def echo(mode: str, inbound: str, outbound: str) -> None:
    """The echo process: receive on PULL, answer on PUSH, until an empty message. In
    "curve" mode its key pair (the parent's too) comes on stdin."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    if mode == "curve":
        pair = KeyPair(*json.loads(sys.stdin.read()))
        gatekeeper = Gatekeeper(ctx, {pair.public: "bench"})
        gatekeeper.start()
        serve_curve(pull, pair)
        connect_curve(push, pair, pair.public)
    pull.bind(inbound)
    push.connect(outbound)
    while True:
        parts = pull.recv_multipart(copy=False)
        if len(parts) == 1 and not parts[0].bytes:
            break
        if mode == "raw":
            push.send_multipart(parts, copy=False)
        else:
            msg = decode(parts)
            value = from_payload(msg.payload)  # type: ignore[union-attr]
            push.send_multipart(encode(Data(msg.unit_id, msg.node_id, to_payload(value))),
                                copy=False)


def round_trips(mode: str, nbytes: int, repeats: int) -> list[float]:
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    pair = KeyPair.make()
    gatekeeper = Gatekeeper(ctx, {pair.public: "bench"})
    if mode == "curve":
        gatekeeper.start()
        serve_curve(pull, pair)
        connect_curve(push, pair, pair.public)
    back = pull.bind_to_random_port("tcp://127.0.0.1")
    port = back + 1 if back < 65000 else back - 1000
    child = subprocess.Popen([sys.executable, __file__, "--echo", mode,
                              f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{back}"],
                             stdin=subprocess.PIPE, text=True)
    assert child.stdin is not None
    child.stdin.write(json.dumps([pair.public, pair.secret]) if mode == "curve" else "")
    child.stdin.close()
    try:
        push.connect(f"tcp://127.0.0.1:{port}")
        msg = message(nbytes)
        raw_frames = encode(msg)
        times = []
        for i in range(repeats + 3):
            start = time.perf_counter()
            if mode == "raw":
                push.send_multipart(raw_frames, copy=False)
                pull.recv_multipart(copy=False)
            else:
                push.send_multipart(encode(msg), copy=False)
                got = decode(pull.recv_multipart(copy=False))
                from_payload(got.payload)  # type: ignore[union-attr]
            if i >= 3:  # warm-up: connection setup, first allocations
                times.append(time.perf_counter() - start)
        push.send(b"")
        child.wait(timeout=30)
        return times
    finally:
        if child.poll() is None:
            child.kill()
        push.close(linger=0)
        pull.close(linger=0)
        gatekeeper.stop()
        ctx.term()


def transfer_table(repeats: int) -> dict[str, dict[str, float]]:
    out = {}
    for label, nbytes in SIZES.items():
        n = repeats if nbytes < (16 << 20) else max(5, repeats // 20)
        raw = statistics.median(round_trips("raw", nbytes, n))
        ours = statistics.median(round_trips("moeflow", nbytes, n))
        curve = statistics.median(round_trips("curve", nbytes, n))
        out[label] = {"raw_rtt_us": raw * 1e6, "moeflow_rtt_us": ours * 1e6,
                      "curve_rtt_us": curve * 1e6, "curve_gb_s": 2 * nbytes / curve / 1e9,
                      "curve_ratio": curve / raw,
                      "raw_gb_s": 2 * nbytes / raw / 1e9, "moeflow_gb_s": 2 * nbytes / ours / 1e9,
                      "ratio": ours / raw}
    return out


def decode_rates(checkpoint: Path, repeats: int) -> dict[str, float]:
    from moeflow.serve.llm import LLM
    from moeflow.ops.sampling import SamplingParams

    out = {}
    for transport in ("inproc", "zmq"):
        with LLM(checkpoint, devices="cpu:0,cpu:1", transport=transport) as llm:
            for batch in (1, 16):
                prompts = [[100 + i + j for j in range(16)] for i in range(batch)]
                params = SamplingParams(max_new_tokens=33, ignore_eos=True)
                llm.generate(prompts, sampling=params)  # warm-up
                rates = []
                for _ in range(repeats):
                    done = llm.generate(prompts, sampling=params)
                    span = max(c.e2e_s for c in done) - max(c.ttft_s for c in done)
                    rates.append(batch * 32 / span)
                out[f"{transport}_bs{batch}_tok_s"] = statistics.median(rates)
    return out


def two_actors(checkpoint: Path, **options: float) -> tuple[object, object, object]:
    """(spec, cluster, executor): `checkpoint` on actor processes cpu:0 and cpu:1."""
    from moeflow.actors.coordinator import ZmqExecutor
    from moeflow.models.families import load_spec
    from moeflow.scheduler import Cluster

    spec = load_spec(checkpoint)
    cluster = Cluster.sharded(("cpu:0", "cpu:1"), spec.moe.num_experts)
    executor = ZmqExecutor(str(checkpoint), cluster.placement, spec.dtype, 8192, **options)
    return spec, cluster, executor


def detection_times(checkpoint: Path, tries: int) -> dict[str, float]:
    """Seconds from a signal to cpu:1 until the request it serves is found to have lost it
    (and waits to run again)."""
    from moeflow.scheduler import BatchEP
    from moeflow.serve.engine import EngineCore
    from moeflow.ops.sampling import SamplingParams

    spec, cluster, executor = two_actors(checkpoint)
    out = {}
    with executor:  # type: ignore[attr-defined]
        for name, signum in (("sigkill", signal.SIGKILL), ("sigstop", signal.SIGSTOP)):
            times = []
            for _ in range(tries):
                engine = EngineCore(spec, executor, BatchEP(), cluster)  # type: ignore[arg-type]
                request = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=400,
                                                                       ignore_eos=True))
                stepping = threading.Thread(target=_run, args=(engine,))
                stepping.start()
                while len(request.output_ids) < 2 and request.finish_reason is None:
                    time.sleep(0.005)
                os.kill(executor.pids()["cpu:1"], signum)  # type: ignore[attr-defined]
                sent = time.monotonic()
                while request.retries == 0 and request.finish_reason is None:
                    time.sleep(0.005)
                times.append(time.monotonic() - sent)
                stepping.join()  # it ran again once cpu:1 was back
                restart = executor.last_restart  # type: ignore[attr-defined]
                if request.finish_reason != "length" or "cpu:1 died" not in (restart or ""):
                    raise RuntimeError(f"{name}: the request ended with "
                                       f"{request.finish_reason} ({restart})")
            out[f"{name}_detect_s"] = statistics.median(times)
            out[f"{name}_detect_max_s"] = max(times)
    return out


def _run(engine: object) -> None:
    while engine.has_unfinished():  # type: ignore[attr-defined]
        engine.step()  # type: ignore[attr-defined]


def prefill_alarm(checkpoint: Path, stall_timeout: float,
                  prompt_len: int = 512) -> dict[str, object]:
    """A long prefill on 2 actors: its time, and whether anything raised an alarm."""
    from moeflow.scheduler import BatchEP
    from moeflow.serve.engine import EngineCore
    from moeflow.ops.sampling import SamplingParams

    spec, cluster, executor = two_actors(checkpoint, stall_timeout=stall_timeout)
    with executor:  # type: ignore[attr-defined]
        pids = executor.pids()  # type: ignore[attr-defined]
        engine = EngineCore(spec, executor, BatchEP(), cluster,  # type: ignore[arg-type]
                            max_batch_tokens=prompt_len)
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        vocab = spec.vocab_size  # type: ignore[attr-defined]
        engine.add_request([5, 6, 7], params)  # warm-up
        _run(engine)
        request = engine.add_request([(100 + 7 * i) % vocab for i in range(prompt_len)], params)
        started = time.monotonic()
        _run(engine)
        took = time.monotonic() - started
        alarms = []
        if request.finish_reason != "length":
            alarms.append(f"the request ended with {request.finish_reason}")
        if request.retries:  # a job failed, silently run again
            alarms.append("the request ran again")
        if executor.pids() != pids:  # type: ignore[attr-defined]
            alarms.append("an actor was restarted")
        dropped = {k: v for k, v in executor.dropped.items()}  # type: ignore[attr-defined]
        if dropped:
            alarms.append(f"the coordinator dropped {dropped}")
    return {"stall_timeout_s": stall_timeout, "prefill_s": took, "false_alarms": alarms}


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--echo":
        echo(sys.argv[2], sys.argv[3], sys.argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-faults", action="store_true")
    parser.add_argument("--skip-transfers", action="store_true")
    parser.add_argument("--fault-tries", type=int, default=5)
    parser.add_argument("--checkpoint", type=Path, default=Path(".cache/bench-qwen3-moe"))
    args = parser.parse_args()
    from moeflow.cli import check_output

    check_output(parser, args.json, "--json")  # before minutes of measuring
    torch.set_num_threads(1)
    results: dict[str, object] = {}
    if not args.skip_transfers:
        results["transfers"] = transfer_table(args.repeats)
        print("\nper-transfer round trip between two processes (median), moeflow vs raw pyzmq")
        print(f"{'payload':8s} {'raw us':>10s} {'moeflow us':>11s} {'raw GB/s':>9s} "
              f"{'ours GB/s':>9s} {'ratio':>6s} {'curve us':>10s} {'curve GB/s':>10s} "
              f"{'ratio':>6s}")
        for label, row in results["transfers"].items():  # type: ignore[union-attr]
            print(f"{label:8s} {row['raw_rtt_us']:10.1f} {row['moeflow_rtt_us']:11.1f} "
                  f"{row['raw_gb_s']:9.2f} {row['moeflow_gb_s']:9.2f} {row['ratio']:5.2f}x "
                  f"{row['curve_rtt_us']:10.1f} {row['curve_gb_s']:10.2f} "
                  f"{row['curve_ratio']:5.2f}x")
    code = 0
    if not args.skip_faults:
        from moeflow.models.tiny import make_tiny

        with tempfile.TemporaryDirectory() as tmp:
            tiny = make_tiny("qwen3_moe", Path(tmp) / "tiny")
            faults = detection_times(tiny, args.fault_tries)
            bench = (args.checkpoint / "config.json").exists()
            # the default stall timeout, and one well under the prefill's own time
            prefills = [prefill_alarm(args.checkpoint if bench else tiny, stall)
                        for stall in (3.0, 0.5)]
        results["faults"] = {**faults, "prefill_512": prefills}
        print(f"\nfault detection, 2 actors, median of {args.fault_tries} (max): "
              f"SIGKILL {faults['sigkill_detect_s']:.2f} s ({faults['sigkill_detect_max_s']:.2f}), "
              f"SIGSTOP {faults['sigstop_detect_s']:.2f} s ({faults['sigstop_detect_max_s']:.2f})")
        for row in prefills:
            alarms: list[str] = row["false_alarms"]  # type: ignore[assignment]
            print(f"512-token prefill on {'the benchmark' if bench else 'a tiny'} checkpoint, "
                  f"stall timeout {row['stall_timeout_s']:.1f} s: {row['prefill_s']:.2f} s, "
                  f"{'no false alarm' if not alarms else 'FALSE ALARM: ' + '; '.join(alarms)}")
            code = 1 if alarms else code
    if not args.skip_decode:
        if not (args.checkpoint / "config.json").exists():
            print(f"\n(no checkpoint at {args.checkpoint}: run benchmarks/foundation.py first)")
        else:
            rates = decode_rates(args.checkpoint, 3)
            results["decode"] = rates
            print("\ndecode tok/s, 2 devices: in-process vs 2 actor processes over ZeroMQ")
            for batch in (1, 16):
                a, b = rates[f"inproc_bs{batch}_tok_s"], rates[f"zmq_bs{batch}_tok_s"]
                print(f"batch {batch:2d}: in-process {a:7.1f}   actors {b:7.1f}   "
                      f"ratio {b / a:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
