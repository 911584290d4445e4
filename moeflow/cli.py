"""The `moeflow` command line.

    moeflow make-tiny FAMILY OUT_DIR [--layers ... --seed ...]
    moeflow generate MODEL_DIR (--prompt TEXT | --prompt-ids 1,2,3) --max-new-tokens N
                     [--devices cpu:0,cpu:1] [--dtype auto] [--json] [--stats]
                     [--trace run.json]  (serve takes it too: every node the actors ran)
    moeflow graph MODEL_DIR --out FILE.{dot,html} [--layer N] [--devices ...]
    moeflow simulate --model NAME|DIR --hardware NAME|FILE --scheduler NAME
                     --workload poisson:rate=R|burst|trace:FILE [--trace out.json|out.html]
                     [--dtype fp8]      (hardware: a preset, any node size: h800x4)
    moeflow plan [--model mixtral-8x7b] [--hardware t4] [--cpu-cores N] [--cpu-memory 192GB]
                 [--prompt N] [--gen N]   (MoE-Lightning's HRM: cgopipe's policy)
    moeflow calibrate [--out cpu.json] [--kernels] [--quick]
    moeflow serve MODEL_DIR [--bind tcp://127.0.0.1:5555] [--http 127.0.0.1:8000]
                  [--scheduler batch-ep] [--devices cpu:0]
                  [--transport inproc|zmq] [--dtype auto] [--max-waiting 64]
                  [--max-prompt-tokens N] [--max-prompt-bytes N] [--max-new-tokens-limit 4096]
                  [--metrics-port N] [--api-key KEY] [--chat-template FILE]
                  [--served-model-name NAME]
                  [--curve-secret-key FILE --curve-public-keys DIR]
    moeflow bench (--connect tcp://127.0.0.1:5555 | --backend openai --base-url http://...)
                  --workload poisson:rate=R --num-requests N
                  [--prompt-len uniform:16-64] [--output-len uniform:8-32] [--seed 0]
                  [--goodput ttft:MS tpot:MS] [--json out.json] [--timeout 600]

Errors in what the user gave (a bad checkpoint, a bad flag value) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from moeflow.models.families import FAMILIES, ConfigError
from moeflow.models.tokenizer import TokenizerError
from moeflow.scheduler.registry import UnknownScheduler
from moeflow.serve.config import DTYPES, TRANSPORTS

# a bad checkpoint (moeflow.models.checkpoint.CheckpointError) is a ValueError: naming it
# here would import torch into every command, `simulate` and `plan` too (~1 s)
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, TokenizerError, UnknownScheduler, ValueError, KeyError, FileNotFoundError)


def _token_ids(text: str) -> list[int]:
    try:  # every field an integer: "1,,2" is a typo, not [1, 2]
        ids = [int(t) for t in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given")
    return ids


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _workload_arguments(parser: argparse.ArgumentParser, *, num_requests: int, prompt_len: str,
                        output_len: str) -> None:
    """The workload options `simulate` and `bench` share (moeflow.sim.workload)."""
    parser.add_argument("--workload", default="poisson:rate=10",
                        help="arrivals: poisson:rate=R (requests a second), burst (all at "
                             "once), or trace:FILE (JSON lines) (default: %(default)s)")
    parser.add_argument("--num-requests", type=_positive, default=num_requests,
                        help="requests simulated (default: %(default)s)")
    parser.add_argument("--prompt-len", default=prompt_len,
                        help="prompt tokens: fixed:N, uniform:A-B or lognormal:MEAN,SIGMA "
                             "(default: %(default)s)")
    parser.add_argument("--output-len", default=output_len,
                        help="output tokens, as --prompt-len (default: %(default)s)")


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The EngineConfig options `generate` and `serve` share."""
    parser.add_argument("--scheduler", default="batch-ep",
                        help="batch-ep, fine-ep, eps, cgopipe, flexgen, an installed plugin's "
                             "name, or module:Class")
    parser.add_argument("--devices", default="cpu:0", help="e.g. cpu:0,cpu:1")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--transport", default="inproc", choices=TRANSPORTS,
                        help="actors in this process, or one process per device over ZeroMQ")
    parser.add_argument("--kv-cache-tokens", type=_positive, default=65536,
                        help="KV-cache capacity per device, in tokens")
    parser.add_argument("--max-batch-tokens", type=_positive, default=2048,
                        help="tokens in flight in one step at most (prompts are cut into "
                             "chunks to fit; default: 2048)")
    parser.add_argument("--max-seqs", type=_positive, default=64,
                        help="sequences in flight in one step at most (default: 64)")
    parser.add_argument("--gpu-memory", metavar="SIZE",
                        help="cgopipe/flexgen: weights the first device (the GPU) may hold, "
                             "e.g. 512KB or 2GB; the other experts are paged in from the last")
    parser.add_argument("--hardware", metavar="NAME|FILE",
                        help="cgopipe: the machine, as `simulate` takes it (t4, l4, h100, or "
                             "a `moeflow calibrate` file); HRM's policy search on it sets "
                             "the micro-batch size")
    parser.add_argument("--lengths", metavar="PROMPT:GEN",
                        help="with --hardware: the mean prompt and generated tokens HRM "
                             "plans for (serve: default 77:128; generate: this prompt's)")
    parser.add_argument("--trace", metavar="FILE.json",
                        help="write a Chrome trace of every node the actors run (open it in "
                             "ui.perfetto.dev; the first 2 million); complete when the engine "
                             "stops")


def _engine_config(args: argparse.Namespace, **extra: Any) -> Any:
    from moeflow.serve.config import EngineConfig

    return EngineConfig(args.model_dir, args.scheduler, args.devices, args.dtype,
                        args.transport, args.kv_cache_tokens, args.max_batch_tokens,
                        args.max_seqs, gpu_memory=args.gpu_memory, trace=args.trace,
                        hardware=args.hardware, **{"lengths": args.lengths, **extra})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflow", description=(
        "Serve Mixture-of-Experts language models as dataflow graphs."))
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny", help="write a small random checkpoint in HF layout")
    tiny.add_argument("family", choices=sorted(FAMILIES))
    tiny.add_argument("out_dir")
    for name, default in (("layers", 2), ("experts", 8), ("top-k", 2), ("hidden", 64),
                          ("heads", 4), ("kv-heads", 2), ("head-dim", 16),
                          ("intermediate", 32), ("dense-intermediate", 96),
                          ("shared-intermediate", 48), ("vocab", 512)):
        tiny.add_argument(f"--{name}", type=_positive, default=default)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    tiny.add_argument("--shards", type=_positive, default=1,
                      help="write N safetensors shards plus model.safetensors.index.json")
    tiny.add_argument("--no-tokenizer", action="store_true",
                      help="leave out tokenizer.json (the model then takes token ids only)")
    tiny.add_argument("--mxfp4", action="store_true",
                      help="gpt_oss: store the experts MXFP4-packed, as the hub's checkpoints")

    gen = sub.add_parser("generate", help="generate from one prompt")
    gen.add_argument("model_dir")
    group = gen.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="text prompt (needs the checkpoint's tokenizer)")
    group.add_argument("--prompt-ids", type=_token_ids, help="token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=_positive, default=32,
                     help="tokens to generate at most (default: 32)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 (the default) is greedy")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="nucleus sampling: the likeliest tokens holding this much "
                          "probability (default: 1, off)")
    gen.add_argument("--top-k", type=int, default=0,
                     help="sample among the k likeliest tokens (default: 0, off)")
    gen.add_argument("--seed", type=int, default=None,
                     help="makes sampling reproducible, in [0, 2^64)")
    _engine_arguments(gen)
    gen.add_argument("--json", action="store_true",
                     help='print {"token_ids": [...], "text": ..., "finish_reason": ...}')
    gen.add_argument("--stats", action="store_true", help="print prefill and decode speed")
    gen.add_argument("--record-routing", metavar="FILE",
                     help="write rows per expert per layer (for simulate --routing recorded:FILE)")

    graph = sub.add_parser("graph", help="draw the dataflow graph of one forward pass")
    graph.add_argument("model_dir")
    graph.add_argument("--out", required=True, help="output file: .dot or .html")
    graph.add_argument("--layer", type=int, action="append",
                       help="layer(s) to draw (repeatable; default: all)")
    graph.add_argument("--devices", default="cpu:0")
    graph.add_argument("--prompt-len", type=_positive, default=8,
                       help="tokens in the drawn unit (one sequence per device)")
    sim = sub.add_parser("simulate", help="simulate serving at any scale with a cost model")
    sim.add_argument("--model", required=True,
                     help="a preset (mixtral-8x7b, deepseek-v2, ...) or a checkpoint directory")
    sim.add_argument("--hardware", required=True,
                     help="a preset (h100x8, h800x4: any xN, a100-80g, t4, ...) or a "
                          "`moeflow calibrate` file")
    sim.add_argument("--scheduler", default="batch-ep",
                     help="batch-ep, fine-ep, eps, cgopipe, flexgen, an installed plugin's "
                          "name, or module:Class")
    _workload_arguments(sim, num_requests=200, prompt_len="uniform:128-512",
                        output_len="uniform:32-256")
    sim.add_argument("--routing", default="uniform",
                     help="uniform, zipf:s=S, recorded:FILE or remote")
    sim.add_argument("--dtype", default=None,
                     help="bfloat16, float16, float32, or fp8 (fp8 weights and GEMMs, bf16 "
                          "activations; needs fp8 hardware: h100, h800, h200, l4); default: "
                          "the model's own")
    sim.add_argument("--max-batch-tokens", type=_positive, default=8192,
                     help="tokens in flight in one step at most (default: 8192)")
    sim.add_argument("--max-seqs", type=_positive, default=256,
                     help="sequences in flight in one step at most (default: 256)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--trace", help="write the trace: .json (Perfetto) or .html (timeline)")
    sim.add_argument("--json", dest="json_out", help="write the metrics as JSON here")

    plan = sub.add_parser("plan", help="search the CGOPipe policy for a GPU too small for the "
                                       "weights (MoE-Lightning's HRM)")
    plan.add_argument("--model", default="mixtral-8x7b", help="a model preset")
    plan.add_argument("--hardware", default="t4",
                      help="a GPU with its host: t4 or l4 (HRM's own figures), another "
                           "simulator preset (h100, ...), or a `moeflow calibrate` file")
    plan.add_argument("--cpu-cores", type=_positive, default=None,
                      help="host cores (default: the preset's)")
    plan.add_argument("--cpu-memory", default=None,
                      help="host memory, e.g. 192GB or 180GiB (default: the preset's)")
    plan.add_argument("--prompt", type=_positive, default=None,
                      help="mean prompt tokens (default: MTBench's 77)")
    plan.add_argument("--gen", type=_positive, default=128, help="tokens generated per request")

    cal = sub.add_parser("calibrate", help="measure this machine's CPU: for the simulator "
                                           "(--out) and for the CPU worker's kernels "
                                           "(--kernels)")
    cal.add_argument("--out", default=None, help="hardware description to write (.json)")
    cal.add_argument("--kernels", action="store_true",
                     help="time moeflow's CPU kernels against torch by rows per weight and "
                          "save the crossovers the CPU worker takes on this machine")
    cal.add_argument("--quick", action="store_true", help="fewer repetitions")

    serve = sub.add_parser("serve", help="serve the request protocol (docs/protocol.md) on "
                                         "ZeroMQ, and/or the OpenAI API over HTTP "
                                         "(docs/http.md)")
    serve.add_argument("model_dir")
    serve.add_argument("--bind", default=None,
                       help="zmq endpoint (default tcp://127.0.0.1:5555 unless --http is "
                            "given alone); a non-loopback address needs CURVE")
    serve.add_argument("--http", metavar="HOST:PORT", default=None,
                       help="serve the OpenAI-compatible API here (port 0: any free port); "
                            "a non-loopback host needs --api-key")
    serve.add_argument("--api-key", default=None,
                       help="the Bearer token HTTP clients must send (default: the "
                            "MOEFLOW_API_KEY environment variable, if set)")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="without an API key, a Host name HTTP calls may give beside "
                            "localhost/127.0.0.1/[::1] (a local reverse proxy's public name; "
                            "repeatable)")
    serve.add_argument("--chat-template", metavar="FILE", default=None,
                       help="a Jinja2 chat template replacing the checkpoint's")
    serve.add_argument("--served-model-name", default=None,
                       help='the "model" HTTP clients name (default: MODEL_DIR as given)')
    _engine_arguments(serve)
    serve.add_argument("--max-waiting", type=_positive, default=64,
                       help="requests in progress beyond which new ones get `overloaded` "
                            "(default: 64)")
    serve.add_argument("--max-prompt-tokens", type=_positive, default=None,
                       help="the longest prompt in tokens (default: the engine's context - 1, "
                            "the context being the smaller of the model's "
                            "max_position_embeddings and --kv-cache-tokens)")
    serve.add_argument("--max-prompt-bytes", type=_positive, default=None,
                       help="the longest text prompt in UTF-8 bytes, checked before tokenizing "
                            "(default: 16 per prompt token, at most 8 MiB)")
    serve.add_argument("--max-new-tokens-limit", type=_positive, default=4096,
                       help="the most tokens a request may ask for (default: 4096)")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="serve GET /metrics (Prometheus) on 127.0.0.1:PORT (0: any port)")
    serve.add_argument("--curve-secret-key", metavar="FILE",
                       help="the server's zmq certificate with its secret key")
    serve.add_argument("--curve-public-keys", metavar="DIR",
                       help="directory of the allowed clients' public certificates")

    bench = sub.add_parser("bench", help="drive a `moeflow serve` with a workload and report "
                                         "latency and throughput")
    bench.add_argument("--backend", default="zmq", choices=("zmq", "openai"),
                       help="the server's ZeroMQ protocol (--connect) or its OpenAI-compatible "
                            "HTTP front end (--base-url)")
    bench.add_argument("--connect", default="tcp://127.0.0.1:5555", help="zmq: its address")
    bench.add_argument("--base-url", default="http://127.0.0.1:8000",
                       help="openai: the server's root URL (/health, /v1/completions)")
    bench.add_argument("--api-key", default=None,
                       help="openai: Bearer token (default: $OPENAI_API_KEY if set)")
    bench.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                       help="SLOs for goodput, e.g. ttft:300 tpot:50 (e2e:MS too)")
    _workload_arguments(bench, num_requests=100, prompt_len="uniform:16-64",
                        output_len="uniform:8-32")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", dest="json_out", help="write per-request records and the "
                                                       "summary here")
    bench.add_argument("--timeout", type=float, default=600.0,
                       help="seconds for the whole run; unfinished requests count as errors")
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised where the command runs: it unwinds as Ctrl-C does (a trace in
    progress removed, actors stopped), not killed on the spot."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    from moeflow.ops.onednn_cache import bound_onednn_cache

    bound_onednn_cache()  # before the first GEMM: a server meets a new shape per prompt
    previous = None
    if threading.current_thread() is threading.main_thread():  # serve sets its own
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"moeflow {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path given that cannot be written or read (permissions,
        # a file where a directory should be, a full disk): the user's to fix, no traceback
        if exc.filename is None:
            raise
        print(f"moeflow {args.command}: error: {exc.filename}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except _Terminated:
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _message(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from moeflow.models.tiny import TinyShape, make_tiny

    shape = TinyShape(layers=args.layers, experts=args.experts, top_k=args.top_k,
                      hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                      head_dim=args.head_dim, intermediate=args.intermediate,
                      dense_intermediate=args.dense_intermediate,
                      shared_intermediate=args.shared_intermediate, vocab=args.vocab)
    out = make_tiny(args.family, args.out_dir, shape, seed=args.seed, dtype=args.dtype,
                    shards=args.shards, tokenizer=not args.no_tokenizer, mxfp4=args.mxfp4)
    print(f"wrote a tiny {args.family} checkpoint to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from moeflow.serve.llm import LLM
    from moeflow.ops.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.record_routing:  # found before the model loads and runs, not after
        _check_writable(args.record_routing, "--record-routing")
    extra: dict[str, Any] = {}
    if args.hardware is not None:  # HRM plans for this request, and says what it chose
        _show_policy()
        if args.lengths is None:
            extra["lengths"] = (_prompt_tokens(args), max(2, args.max_new_tokens))
    llm = LLM(_engine_config(args, max_waiting=1 << 30,
                             record_routing=bool(args.record_routing), **extra))
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    with llm:
        [out] = llm.generate(prompt, sampling=params)
    if args.json:
        print(json.dumps({"token_ids": list(out.token_ids), "text": out.text,
                          "finish_reason": out.finish_reason}))
    elif args.prompt is not None:
        print(args.prompt + out.text)
    else:
        print(out.text if llm.tokenizer else " ".join(map(str, out.token_ids)))
    if args.record_routing:
        from pathlib import Path

        Path(args.record_routing).write_text(json.dumps(llm.routing_recording()) + "\n")
    if (out.finish_reason or "").startswith("error"):  # what it made is shown; the
        # failure too, and the exit status says so
        print(f"moeflow generate: {out.finish_reason}", file=sys.stderr)
        return 1
    if args.stats:
        print(f"prefill: {len(out.prompt_token_ids)} tokens in {out.ttft_s * 1e3:.1f} ms "
              f"({out.prefill_tokens_per_s:.0f} tok/s); decode: {len(out.token_ids)} tokens, "
              f"{out.decode_tokens_per_s:.1f} tok/s; devices {args.devices}, "
              f"dtype {llm.dtype}".replace("torch.", "") + _kernel_note(args.devices,
                                                                         llm.dtype),
              file=sys.stderr)
    return 0


def _show_policy() -> None:
    """What a searched policy chose (the "moeflow.policy" log), on stderr."""
    import logging

    log = logging.getLogger("moeflow.policy")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _prompt_tokens(args: argparse.Namespace) -> int:
    """The prompt's length in tokens (its text through the checkpoint's tokenizer)."""
    if args.prompt is None:
        return max(1, len(args.prompt_ids))
    from moeflow.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.model_dir)
    if tokenizer is None:
        raise ValueError(f"{args.model_dir} has no tokenizer: give --prompt-ids")
    return max(1, len(tokenizer.encode(args.prompt)))


def _kernel_note(devices: str, dtype: Any) -> str:
    """The CPU GEMM path for the run's dtype, for a stats line of a run with CPU devices."""
    if "cpu" not in devices:
        return ""
    from moeflow.ops.cpu.choice import describe

    return f"; CPU GEMMs: {describe(dtype)}"


def cmd_graph(args: argparse.Namespace) -> int:
    from moeflow.actors.inproc import parse_devices
    from moeflow.dataflow import Cut, Placement, SeqChunk, Unit, compile
    from moeflow.dataflow.render import write
    from moeflow.models.families import load_spec

    spec = load_spec(args.model_dir)
    devices = parse_devices(args.devices)
    for layer in args.layer or []:
        if not 0 <= layer < spec.num_layers:
            raise ValueError(f"--layer {layer} is outside 0..{spec.num_layers - 1}")
    unit = Unit(tuple(SeqChunk(i, 0, args.prompt_len, d) for i, d in enumerate(devices)))
    graph = compile(spec, unit, Placement.sharded(devices, spec.moe.num_experts), Cut())
    write(graph, args.out, layers=args.layer, title=f"{spec.name} ({spec.family})")
    print(f"wrote {args.out}: {len(graph.nodes)} nodes in the full graph")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from moeflow.progress import Progress
    from moeflow.sim import hardware, models
    from moeflow.scheduler.registry import make_scheduler
    from moeflow.scheduler.cgopipe import CGOPipe
    from moeflow.scheduler.eps import EPS
    from moeflow.sim.eps_costs import with_hardware_costs
    from moeflow.sim.offload import check_offload_hardware, offload_layout
    from moeflow.sim.simulator import SimulationError, Simulator
    from moeflow.sim.tracefile import open_trace
    from moeflow.sim.workload import Lengths, Routing, requests

    if args.json_out:  # found before the run, not after it
        _check_writable(args.json_out, "--json")
    spec = models.load(args.model)
    hw = hardware.load(args.hardware)
    routing = Routing.parse(args.routing, spec.moe.num_experts, spec.moe.top_k,
                            spec.num_layers, seed=args.seed, moe_layers=spec.moe_layers)
    reqs = requests(args.workload, args.num_requests, Lengths.parse(args.prompt_len),
                    Lengths.parse(args.output_len), seed=args.seed)
    # eps chooses PN with the cost model's own figures for this hardware and dtype
    scheduler = with_hardware_costs(make_scheduler(args.scheduler), spec, hw, args.dtype)
    placement = homes = None
    if isinstance(scheduler, CGOPipe):  # before HRM searches on hardware it cannot use
        check_offload_hardware(hw, scheduler.name)
    if type(scheduler) is CGOPipe:
        scheduler = _hrm_cgopipe(spec, hw, reqs, args.max_seqs)
    if isinstance(scheduler, CGOPipe):  # one GPU and its host, experts paged in
        placement, homes = offload_layout(spec, hw, scheduler, args.dtype,
                                          args.max_batch_tokens, args.max_seqs)
    try:
        sim = Simulator(spec, hw, scheduler, routing, dtype=args.dtype, placement=placement,
                        homes=homes, max_batch_tokens=args.max_batch_tokens,
                        max_seqs=args.max_seqs)
    except SimulationError as exc:  # the model does not fit: the user's choice of sizes
        raise ValueError(str(exc)) from None
    title = (f"{spec.name or spec.family} on {hw.name}, {args.scheduler}, {args.workload}, "
             f"{len(reqs)} requests")
    if args.trace:  # an .html timeline is written at the end only: check it before the run
        from pathlib import Path

        from moeflow.sim.trace import FORMATS

        if Path(args.trace).suffix.lower() in FORMATS:  # else open_trace says what to use
            Path(args.trace).parent.mkdir(parents=True, exist_ok=True)  # as writers do
            _check_writable(args.trace, "--trace")
    sink = open_trace(args.trace, title) if args.trace else None  # streams as it runs
    # counted in output tokens: under a burst every request finishes near the end
    bar = Progress(sum(r.output for r in reqs), "simulating (output tokens)")
    shapes = _EpsShapes() if isinstance(scheduler, EPS) else None
    try:
        result = sim.run(reqs, token_progress=bar.update, record=False, sink=sink,
                         on_plan=shapes.see if shapes is not None else None)
    except BaseException as exc:
        if sink is not None:
            sink.abort()
        if isinstance(exc, SimulationError):  # e.g. a request outgrew its KV cache
            raise ValueError(str(exc)) from None
        raise
    print(title)
    print(result.metrics.table())
    context = spec.max_position_embeddings
    long = sum(1 for r in reqs if r.prompt + r.output > context)
    if long:  # simulated all the same: the cost model has no context limit
        print(f"note: {long} of {len(reqs)} requests run past the model's context of "
              f"{context:,} tokens (a server would refuse them)")
    if result.kernels:  # a scheduler's on_routing chose routed experts' kernels
        totals: dict[str, int] = {}
        for chosen in result.kernels.values():
            for kernel, n in chosen.items():
                totals[kernel] = totals.get(kernel, 0) + n
        print("expert kernels (on_routing): " + ", ".join(
            f"{kernel} {n:,} expert groups" for kernel, n in sorted(totals.items()))
            + f" over {len(result.kernels)} layers")
    if shapes is not None:
        print(f"eps: units run {shapes.summary()}")
    if sink is not None:
        sink.close(result)
        print(f"wrote {args.trace} ({result.num_events} events)")
    if args.json_out:
        from pathlib import Path

        Path(args.json_out).write_text(json.dumps(_json_safe(
            {"title": title, "metrics": asdict(result.metrics),
             "kernels": {str(layer): k for layer, k in sorted(result.kernels.items())}}),
            indent=2, default=float, allow_nan=False))
    return 0


def _json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float (a percentile of no values: NaN) as None, which
    JSON has; NaN and Infinity are not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class _EpsShapes:
    """How eps ran the units of a simulation: how many with PN stages, with M micro-batches
    (per plan, looked up once; the lookups kept are bounded)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, int], int] = {}
        self._of_plan: dict[int, tuple[int, int]] = {}

    def see(self, job: Any) -> None:
        from moeflow.scheduler.eps import shape_of

        key = job.plan_id if job.plan_id is not None else id(job.plan)
        shape = self._of_plan.get(key)
        if shape is None:
            if len(self._of_plan) > 256:
                self._of_plan.clear()
            shape = self._of_plan[key] = shape_of(job.plan.graph)
        self.counts[shape] = self.counts.get(shape, 0) + 1

    def summary(self) -> str:
        def name(pn: int, m: int) -> str:
            if m > 1:
                return f"in {m} micro-batches" + (f" of PN {pn}" if pn > 1 else "")
            return f"with PN {pn}" if pn > 1 else "unpipelined"

        return ", ".join(f"{n:,} {name(pn, m)}" for (pn, m), n in
                         sorted(self.counts.items(), key=lambda kv: -kv[1]))


def _hrm_cgopipe(spec: Any, hw: Any, reqs: list[Any], max_seqs: int) -> Any:
    """cgopipe with the micro-batch size of HRM's policy on this hardware (HRM's own
    figures for t4 and l4) for this workload's mean lengths."""
    from statistics import fmean

    from moeflow.sim.hrm import HRMError, Workload
    from moeflow.sim.hrm_search import hrm_cgopipe, system_for

    workload = Workload(max(1, round(fmean(r.prompt for r in reqs))),
                        max(2, round(fmean(r.output for r in reqs))))
    try:
        system = system_for(hw, spec.dtype)
    except HRMError as exc:
        from moeflow.scheduler.cgopipe import CGOPipe

        print(f"cgopipe: no HRM system for {hw.name} ({exc}); 3 micro-batches",
              file=sys.stderr)
        return CGOPipe()
    scheduler, line = hrm_cgopipe(spec, system, workload, max_seqs)
    print(line, file=sys.stderr)
    return scheduler


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.out is None and not args.kernels:
        raise ValueError("say what to calibrate: --out FILE (the simulator's description "
                         "of this CPU) and/or --kernels (the CPU worker's kernel choice)")
    if args.out is not None:  # found before minutes of measuring, not after
        _check_writable(args.out)
    if args.kernels:
        from moeflow.ops import cpu
        from moeflow.ops.cpu.calibrate import calibrate_kernels
        from moeflow.ops.cpu.choice import ALL_ROWS, save_choice
        from moeflow.scheduler.eps import cpu_kernel_band

        if not cpu.available():
            raise ValueError(f"moeflow's CPU kernels are not available: {cpu.error()}")

        choice, table = calibrate_kernels(quick=args.quick,
                                          log=lambda msg: print(msg, file=sys.stderr))
        path = save_choice(choice, table)
        def rows(n: int) -> str:
            return "any number of rows" if n >= ALL_ROWS else f"{n} rows"

        if choice.expert_rows >= ALL_ROWS:
            eps = "the grouped kernel at every load"
        else:
            low, high = cpu_kernel_band(choice.expert_rows)
            eps = (f"the grouped kernel below {low:.0f} rows per expert, a GEMM per expert "
                   f"above {high:.0f}")
        panels = (f"; on bf16 pairs, packed panels from {choice.panel_rows} rows per weight, "
                  f"tiles below" if choice.panel_rows else "")
        print(f"wrote {path}: the kernels ({table['isa']}) take linear layers up to "
              f"{rows(choice.linear_rows)} and routed experts up to "
              f"{rows(choice.expert_rows)} per expert (eps: {eps}){panels}")
    if args.out is None:
        return 0
    from moeflow.sim.calibrate import calibrate

    hw = calibrate(quick=args.quick, log=lambda msg: print(msg, file=sys.stderr))
    from pathlib import Path

    Path(args.out).write_text(hw.to_json() + "\n")
    d = hw.device
    print(f"wrote {args.out}: bf16 {d.peak_flops['bfloat16'] / 1e9:.0f} GFLOP/s, fp32 "
          f"{d.peak_flops['float32'] / 1e9:.0f} GFLOP/s, weights stream at "
          f"{d.mem_bandwidth / 1e9:.1f} GB/s, {d.launch_overhead * 1e6:.1f} us per op, "
          f"GEMM half-rate at {d.gemm_half_rows:.0f} rows")
    return 0


def _check_writable(path: str, flag: str = "--out") -> None:
    """ValueError unless a file can be written at `path` (given as `flag`)."""
    from pathlib import Path

    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ValueError(f"{flag} {path}: is a directory")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable")


def check_output(parser: argparse.ArgumentParser, path: str | None, flag: str) -> None:
    """A script's output path, if given, checked before it runs (the benchmarks' --json,
    written after minutes of measuring): `parser.error` (exit 2) if it cannot be written."""
    if path:
        try:
            _check_writable(str(path), flag)
        except ValueError as exc:
            parser.error(str(exc))


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvloop

    from moeflow.serve.security import CurveConfig
    from moeflow.serve.server import EngineFailed, RequestServer, ServerConfig

    if (args.curve_secret_key is None) != (args.curve_public_keys is None):
        raise ValueError("CURVE needs both --curve-secret-key FILE and --curve-public-keys DIR")
    curve = (CurveConfig(args.curve_secret_key, args.curve_public_keys)
             if args.curve_secret_key is not None else None)
    if curve is not None:
        curve.load()  # a bad key file fails here, before the model loads
    bind = args.bind or (None if args.http else "tcp://127.0.0.1:5555")
    api_key = args.api_key if args.api_key is not None else os.environ.get("MOEFLOW_API_KEY")
    if args.chat_template is not None and not os.path.isfile(args.chat_template):
        raise ValueError(f"--chat-template {args.chat_template}: no such file")
    config = ServerConfig(_engine_config(args, max_waiting=args.max_waiting), bind=bind,
                          max_prompt_tokens=args.max_prompt_tokens,
                          max_prompt_bytes=args.max_prompt_bytes,
                          max_new_tokens_limit=args.max_new_tokens_limit,
                          metrics_port=args.metrics_port, curve=curve, http=args.http,
                          api_key=api_key or None, chat_template=args.chat_template,
                          allowed_hosts=tuple(args.allowed_host),
                          served_model_name=args.served_model_name)
    if args.http is not None:
        from moeflow.serve.chat import ChatTemplate

        ChatTemplate.load(args.model_dir, args.chat_template)  # a bad template fails now
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(server: RequestServer) -> None:
        extra = f", metrics {server.metrics_address}" if server.metrics_address else ""
        extra += ", CURVE" if curve is not None else ""
        extra += ", API key" if api_key else ""
        where = " and ".join(a for a in (server.address if bind else None,
                                         server.http_address) if a)
        print(f"serving {args.model_dir} on {where} (scheduler {args.scheduler}, "
              f"devices {args.devices}{extra})", flush=True)

    try:
        uvloop.run(RequestServer(config).serve(ready))
    except EngineFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from moeflow.progress import Progress
    from moeflow.serve.bench import BenchError, format_summary, parse_slos, run_bench

    slos = parse_slos(args.goodput)
    address = args.base_url if args.backend == "openai" else args.connect
    bar = Progress(args.num_requests, "bench")
    try:
        result = run_bench(address, args.workload, args.num_requests, args.prompt_len,
                           args.output_len, args.seed, backend=args.backend,
                           timeout=args.timeout, progress=bar.update, slos=slos,
                           api_key=args.api_key)
    except BenchError as exc:
        print(f"moeflow bench: error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(result["summary"]))
    if args.json_out:
        from pathlib import Path

        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json_out} ({len(result['records'])} requests)")
    summary = result["summary"]
    return 1 if summary["num_errors"] == summary["num_requests"] else 0  # nothing served


def cmd_plan(args: argparse.Namespace) -> int:
    from moeflow.sim.hrm import MTBENCH_PROMPT
    from moeflow.sim.hrm_search import plan_report

    print(plan_report(args.model, args.hardware, args.cpu_cores, args.cpu_memory,
                      args.prompt or MTBENCH_PROMPT, args.gen))
    return 0


COMMANDS = {"make-tiny": cmd_make_tiny, "generate": cmd_generate, "graph": cmd_graph,
            "simulate": cmd_simulate, "plan": cmd_plan, "calibrate": cmd_calibrate,
            "serve": cmd_serve, "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
