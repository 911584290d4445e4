"""Does the simulator, calibrated on this CPU, predict what moeflow measures here?

Calibrates this machine (`moeflow calibrate`), simulates the foundation benchmark's
scenarios (Qwen3-MoE shape, bf16: a 512-token prefill, decode at batch 1 and 16) with the
batch-ep policy on that calibrated device, then runs the same scenarios for real with
moeflow, side by side, and prints predicted against measured.

    python benchmarks/calibration.py [--hardware cpu.json] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from foundation import (  # noqa: E402
    BATCH, CHECKPOINT, DECODE_NEW, DECODE_PROMPT, PREFILL_LEN, SHAPE, bench_moeflow,
)

from moeflow.models.families import load_spec  # noqa: E402
from moeflow.models.tiny import make_tiny  # noqa: E402
from moeflow.sim.calibrate import calibrate  # noqa: E402
from moeflow.scheduler import BatchEP  # noqa: E402
from moeflow.sim import hardware  # noqa: E402
from moeflow.sim.simulator import Simulator  # noqa: E402
from moeflow.sim.workload import Routing, SimRequest  # noqa: E402


def predict(spec, hw) -> dict[str, float]:  # type: ignore[no-untyped-def]
    def run(reqs: list[SimRequest]):  # type: ignore[no-untyped-def]
        routing = Routing.parse("uniform", spec.moe.num_experts, spec.moe.top_k,
                                spec.num_layers, seed=0)
        return Simulator(spec, hw, BatchEP(), routing, max_batch_tokens=2048,
                         max_seqs=64).run(reqs).timings

    [prefill] = run([SimRequest(0.0, PREFILL_LEN, 1)])
    [one] = run([SimRequest(0.0, DECODE_PROMPT, DECODE_NEW + 1)])
    batch = run([SimRequest(0.0, DECODE_PROMPT, DECODE_NEW + 1) for _ in range(BATCH)])
    return {"prefill_tok_s": PREFILL_LEN / prefill.ttft, "decode_bs1_tok_s": 1 / one.tpot,
            f"decode_bs{BATCH}_tok_s": BATCH / batch[0].tpot}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hardware", help="a calibration file (default: calibrate now)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    args = parser.parse_args()
    from moeflow.cli import check_output

    check_output(parser, args.json, "--json")  # before minutes of measuring
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if not (args.checkpoint / "config.json").exists():
        print(f"building the benchmark checkpoint in {args.checkpoint} ...", file=sys.stderr)
        make_tiny("qwen3_moe", args.checkpoint, SHAPE, dtype="bfloat16", seed=0)
    if args.hardware:
        hw = hardware.load(args.hardware)
    else:
        hw = calibrate(log=lambda m: print(m, file=sys.stderr))
    spec = load_spec(args.checkpoint)
    predicted = predict(spec, hw)
    print("measuring moeflow ...", file=sys.stderr)
    measured = bench_moeflow(args.checkpoint, "cpu:0", args.repeats)
    print(f"\nsimulator calibrated on this CPU ({hw.device.name}) vs moeflow measured here")
    print(f"{'metric':22s} {'predicted':>10s} {'measured':>10s} {'error':>8s}")
    errors = {}
    for key, p in predicted.items():
        m = measured[key]
        errors[key] = p / m - 1
        flag = "" if abs(errors[key]) <= 0.30 else "  (outside 30%)"
        print(f"{key:22s} {p:10.1f} {m:10.1f} {errors[key]:+7.0%}{flag}")
    if args.json:
        Path(args.json).write_text(json.dumps({"predicted": predicted, "measured": measured,
                                               "relative_error": errors,
                                               "hardware": json.loads(hw.to_json())},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
