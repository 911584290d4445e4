"""Hardware for the cost model: a roofline per device, links between devices and to the host.

Presets carry figures from the vendors' data sheets (dense tensor-core FLOP/s, no
sparsity; HBM/GDDR bandwidth; NVLink per direction = the data sheet's total / 2). Names:
`t4 l4 a100-80g h100 h800 h200`, each alone or as a node of N GPUs (`h100x8`, `h800x4`:
any N >= 1, all on one switch at the preset's per-GPU link). A JSON file written by
`moeflow calibrate` describes the local CPU the same way.

    moeflow.sim.hardware.load("h100x8")
    moeflow.sim.hardware.load("calibration.json")
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

GB = 1e9
TERA = 1e12


class HardwareError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device's roofline.

    peak_flops        dense FLOP/s per dtype ("bfloat16", "float16", "float32", ...)
    mem_bandwidth     bytes/s its weights and activations stream at
    memory            bytes of device memory
    launch_overhead   seconds per kernel launch (GPU) or per op dispatch (CPU)
    gemm_half_rows    rows sharing a weight at which a GEMM reaches half its peak: the
                      efficiency of a GEMM with m rows is m / (m + gemm_half_rows)
    gemv_rows         up to this many rows per weight a GEMM is a GEMV kernel that streams
                      at mem_bandwidth whatever its FLOPs (0: none)
    activation_bandwidth  bytes/s of elementwise passes over activations (0: mem_bandwidth)
    attention_flops   FLOP/s of the attention kernel itself (0: peak)
    cores             a CPU's cores (0: not stated); HRM's host model reads them
    """

    name: str
    kind: Literal["gpu", "cpu"]
    peak_flops: dict[str, float]
    mem_bandwidth: float
    memory: float
    launch_overhead: float = 4e-6
    gemm_half_rows: float = 32.0
    gemv_rows: float = 0.0
    activation_bandwidth: float = 0.0
    attention_flops: float = 0.0
    cores: int = 0

    def __post_init__(self) -> None:
        if self.mem_bandwidth <= 0 or self.memory <= 0:
            raise HardwareError(f"{self.name}: bandwidth and memory must be > 0")
        if not self.peak_flops or min(self.peak_flops.values()) <= 0:
            raise HardwareError(f"{self.name}: peak_flops needs positive entries")
        if self.launch_overhead < 0 or self.gemm_half_rows < 0:
            raise HardwareError(f"{self.name}: overheads must be >= 0")
        if self.cores < 0:
            raise HardwareError(f"{self.name}: cores must be >= 0, got {self.cores}")

    def flops_for(self, dtype: str) -> float:
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        if dtype == "bfloat16" and "float16" in self.peak_flops:
            return self.peak_flops["float16"]  # e.g. T4: no bf16 tensor cores; runs fp16
        raise HardwareError(f"{self.name} has no peak FLOP/s for {dtype}; known: "
                            f"{', '.join(sorted(self.peak_flops))}")


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """A link: bytes/s in each direction, and a fixed latency per message."""

    bandwidth: float
    latency: float = 5e-6

    def time(self, num_bytes: float, messages: int = 1) -> float:
        """`num_bytes` in `messages` messages, one after another."""
        return 0.0 if num_bytes <= 0 else messages * self.latency + num_bytes / self.bandwidth


HOST = "cpu"  # the host's device name in a simulated node of GPUs


@dataclass(frozen=True, slots=True)
class Hardware:
    """`num_devices` devices of one kind, and for GPUs the host CPU they hang off (`host`,
    named "cpu" in a plan: policies that offload run attention or keep weights there),
    reached over `host_link` (PCIe). A node of CPUs has no other host: its devices are it."""

    name: str
    device: DeviceSpec
    num_devices: int
    link: LinkSpec  # device <-> device
    host_link: LinkSpec  # host memory <-> device
    host_memory: float = 512 * GB
    notes: str = field(default="", compare=False)
    host: DeviceSpec | None = None  # a GPU node's host roofline; None: a generic server CPU

    def __post_init__(self) -> None:
        if self.num_devices < 1:
            raise HardwareError(f"{self.name}: num_devices must be >= 1")
        if self.host is None and self.device.kind == "gpu":
            object.__setattr__(self, "host", _server_host(self.host_memory))

    def device_names(self) -> tuple[str, ...]:
        prefix = "cuda" if self.device.kind == "gpu" else "cpu"
        return tuple(f"{prefix}:{i}" for i in range(self.num_devices))

    def with_host(self) -> tuple[str, ...]:
        """The devices and, for a node of GPUs, its host."""
        names = self.device_names()
        return (*names, HOST) if self.device.kind == "gpu" else names

    def spec(self, device: str) -> DeviceSpec:
        """The roofline of a device of this node: the host's for `HOST` on a GPU node."""
        if device == HOST and self.device.kind == "gpu":
            return self.host  # type: ignore[return-value]
        return self.device

    def memory_of(self, device: str) -> float:
        return self.host_memory if device == HOST and self.device.kind == "gpu" \
            else self.device.memory

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_dict(data: dict[str, Any], source: str = "hardware") -> Hardware:
        try:
            host = data.get("host")
            return Hardware(
                name=data["name"], device=DeviceSpec(**data["device"]),
                num_devices=int(data["num_devices"]), link=LinkSpec(**data["link"]),
                host_link=LinkSpec(**data["host_link"]),
                host_memory=float(data.get("host_memory", 512 * GB)),
                notes=data.get("notes", ""),
                host=None if host is None else DeviceSpec(**host))
        except (KeyError, TypeError) as exc:
            raise HardwareError(f"{source}: not a hardware description ({exc})") from None


def _gpu(name: str, bf16: float, fp32: float, bandwidth_gb: float, memory_gb: float,
         fp8: float | None = None) -> DeviceSpec:
    flops = {"bfloat16": bf16 * TERA, "float16": bf16 * TERA, "float32": fp32 * TERA}
    if fp8:
        flops["float8"] = fp8 * TERA
    return DeviceSpec(name, "gpu", flops, bandwidth_gb * GB, memory_gb * GB)


def _host(name: str, cores: int, tflops: float, bandwidth: float, memory: float) -> DeviceSpec:
    """A host CPU: `tflops` over its cores in bf16 and fp32 alike (AVX-512 FMA, no AMX), its
    socket's memory bandwidth (bytes/s) and capacity (bytes)."""
    flops = tflops * TERA
    return DeviceSpec(f"{name} ({cores} cores)", "cpu", {"bfloat16": flops, "float16": flops,
                                                         "float32": flops},
                      bandwidth, memory, launch_overhead=5e-6, gemm_half_rows=4.0,
                      cores=cores)


def _server_host(memory: float) -> DeviceSpec:
    """A two-socket server's CPUs, for presets that name none: 112 cores, 8 TFLOP/s, 400 GB/s."""
    return _host("server host", 112, 8.0, 400 * GB, memory)


GIB = float(1 << 30)
# MoE-Lightning's hosts (its artifact, caoshiyi/artifacts@asplos25, fastmoe/backend/utils.py
# and benchmarks/mtbench/launch_server.sh; GB there = GiB): the T4's 48-vCPU GCP host at
# 0.8 TFLOP/s and 100 GiB/s, the L4's g2-standard-48 at 1.6 TFLOP/s and 76 GiB/s, both
# 192 GB; their link 16 GiB/s (measured PCIe, not the x16 data sheet's).
_T4_HOST = _host("GCP T4 host", 48, 0.8, 100 * GIB, 192 * GB)
_L4_HOST = _host("GCP g2-standard-48", 48, 1.6, 76 * GIB, 192 * GB)
_PAPER_PCIE = LinkSpec(16 * GIB, 10e-6)

# Data sheet figures. NVLink: total bidirectional / 2 per direction. PCIe: x16 per direction.
_T4 = DeviceSpec("T4", "gpu", {"float16": 65 * TERA, "float32": 8.1 * TERA}, 320 * GB, 16 * GB)
_DEVICES = {
    "t4": (_T4, LinkSpec(15.75 * GB, 10e-6), _PAPER_PCIE, "PCIe Gen3 x16"),
    "l4": (_gpu("L4", 121, 30.3, 300, 24, fp8=242),
           LinkSpec(31.5 * GB, 10e-6), _PAPER_PCIE, "PCIe Gen4 x16"),
    "a100-80g": (_gpu("A100-SXM4-80GB", 312, 19.5, 2039, 80),
                 LinkSpec(300 * GB, 3e-6), LinkSpec(31.5 * GB, 10e-6), "NVLink3 600 GB/s"),
    "h100": (_gpu("H100-SXM5-80GB", 989.5, 67, 3350, 80, fp8=1979),
             LinkSpec(450 * GB, 3e-6), LinkSpec(63 * GB, 10e-6), "NVLink4 900 GB/s"),
    "h800": (_gpu("H800-SXM5-80GB", 989.5, 67, 3350, 80, fp8=1979),
             LinkSpec(200 * GB, 3e-6), LinkSpec(63 * GB, 10e-6), "NVLink 400 GB/s"),
    "h200": (_gpu("H200-SXM-141GB", 989.5, 67, 4800, 141, fp8=1979),
             LinkSpec(450 * GB, 3e-6), LinkSpec(63 * GB, 10e-6), "NVLink4 900 GB/s"),
}


def node(key: str, num_devices: int) -> Hardware:
    """`num_devices` GPUs of preset `key` in one node, with its host: MoE-Lightning's for
    the T4 and the L4, else a two-socket server with 256 GB per GPU (at least 512 GB)."""
    if key not in _DEVICES:
        raise HardwareError(f"unknown device {key!r}; known: {', '.join(sorted(_DEVICES))}")
    if num_devices < 1:
        raise HardwareError(f"{key}x{num_devices}: a node needs at least one device")
    device, link, host_link, notes = _DEVICES[key]
    name = key if num_devices == 1 else f"{key}x{num_devices}"
    host = {"t4": _T4_HOST, "l4": _L4_HOST}.get(key)
    memory = host.memory if host is not None else max(512 * GB, 256 * GB * num_devices)
    return Hardware(name, device, num_devices, link, host_link, memory, notes, host)


def presets() -> dict[str, Hardware]:
    """The listed presets: each device alone and as an 8-GPU node (`load` takes any xN)."""
    return {h.name: h for key in _DEVICES for h in (node(key, 1), node(key, 8))}


_NODE = re.compile(r"([a-z0-9-]+?)x([0-9]+)")


def load(name_or_path: str) -> Hardware:
    """A preset by name (`h800`, `h800x4`, any xN), or a JSON file (as `moeflow calibrate`
    writes)."""
    if name_or_path in _DEVICES:
        return node(name_or_path, 1)
    match = _NODE.fullmatch(name_or_path)
    if match and match.group(1) in _DEVICES:
        return node(match.group(1), int(match.group(2)))
    table = presets()
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise HardwareError(f"{path}: file not found") from None
        except json.JSONDecodeError as exc:
            raise HardwareError(f"{path}: not valid JSON ({exc})") from None
        except (OSError, UnicodeDecodeError) as exc:  # a directory, say
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise HardwareError(f"{path}: cannot read a hardware description ({reason})"
                                ) from None
        return Hardware.from_dict(data, str(path))
    raise HardwareError(f"unknown hardware {name_or_path!r}; presets: "
                        f"{', '.join(sorted(table))}, or a calibration .json file")
