"""The actor runtime's cost, measured side by side in one run.

1. Per transfer, against raw pyzmq. Two processes on this machine, PUSH/PULL both ways:
     raw       the echo process forwards the received frames as they are
     moeflow   every hop goes through the runtime's data path: a Data message with a
               tensor payload is encoded (msgpack header + zero-copy frame), decoded, turned
               into the worker's value and back into a payload, and re-encoded
   for payloads of 4 KiB, 1 MiB and 64 MiB: the median round trip, the throughput, and
   the ratio moeflow / raw (the runtime's overhead per transfer).

2. Decode tokens/s of the benchmark checkpoint with 2 actor processes over ZeroMQ against
   the same 2 devices in process (batch 1 and batch 16).

    python benchmarks/actors.py [--json out.json] [--skip-decode]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import zmq

from moeflow.actors.messages import Data, Payload, decode, encode
from moeflow.actors.worker import Partial, from_payload, to_payload

SIZES = {"4KiB": 4 << 10, "1MiB": 1 << 20, "64MiB": 64 << 20}


def message(nbytes: int) -> Data:
    rows = max(1, nbytes // (1024 * 2))
    y = torch.ones(rows, 1024, dtype=torch.bfloat16)
    return Data(1, 2, to_payload(Partial(0, y)))


def echo(mode: str, inbound: str, outbound: str) -> None:
    """The echo process: receive on PULL, answer on PUSH, until an empty message."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
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
    ctx = zmq.Context.instance()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    back = pull.bind_to_random_port("tcp://127.0.0.1")
    port = back + 1 if back < 65000 else back - 1000
    child = subprocess.Popen([sys.executable, __file__, "--echo", mode,
                              f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{back}"])
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


def transfer_table(repeats: int) -> dict[str, dict[str, float]]:
    out = {}
    for label, nbytes in SIZES.items():
        n = repeats if nbytes < (16 << 20) else max(5, repeats // 20)
        raw = statistics.median(round_trips("raw", nbytes, n))
        ours = statistics.median(round_trips("moeflow", nbytes, n))
        out[label] = {"raw_rtt_us": raw * 1e6, "moeflow_rtt_us": ours * 1e6,
                      "raw_gb_s": 2 * nbytes / raw / 1e9, "moeflow_gb_s": 2 * nbytes / ours / 1e9,
                      "ratio": ours / raw}
    return out


def decode_rates(checkpoint: Path, repeats: int) -> dict[str, float]:
    from moeflow.serve.llm import LLM
    from moeflow.serve.sampling import SamplingParams

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


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--echo":
        echo(sys.argv[2], sys.argv[3], sys.argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--checkpoint", type=Path, default=Path(".cache/bench-qwen3-moe"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, object] = {"transfers": transfer_table(args.repeats)}
    print("\nper-transfer round trip between two processes (median), moeflow vs raw pyzmq")
    print(f"{'payload':8s} {'raw us':>10s} {'moeflow us':>11s} {'raw GB/s':>9s} "
          f"{'ours GB/s':>9s} {'ratio':>6s}")
    for label, row in results["transfers"].items():  # type: ignore[union-attr]
        print(f"{label:8s} {row['raw_rtt_us']:10.1f} {row['moeflow_rtt_us']:11.1f} "
              f"{row['raw_gb_s']:9.2f} {row['moeflow_gb_s']:9.2f} {row['ratio']:5.2f}x")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
