"""Tile configs for the fused MoE kernels, one JSON file per expert shape and device.

A file is named by its key, `E=8,N=14336,K=4096,dtype=bfloat16,device=NVIDIA_H200.json`
(N the FFN width F, K the hidden size D; the device as `torch.cuda.get_device_name` spells
it, spaces as underscores, or `interpreter` for `TRITON_INTERPRET=1` on the CPU). It maps
token counts to tiles:

    {"source": "...", "configs": {"1": {"block_m": 16, ...}, "64": {...}}}

A lookup takes the entry whose token count is nearest; when no file matches the key,
`default_config` picks tiles from the rows each expert sees. `benchmarks/kernels.py --tune`
writes a file for the GPU it runs on. Pure Python: importing this pulls in no torch.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"
INTERPRETER = "interpreter"


@dataclass(frozen=True, slots=True)
class TileConfig:
    """Tiles of one fused-MoE launch: BLOCK_M rows of one expert, BLOCK_N output columns
    (of 2F in the gate_up GEMM, half gate and half up; of D in the down GEMM),
    BLOCK_K of the reduction per step, GROUP_M row blocks swept together (L2 reuse of the
    weight tiles), and the launch's warps and pipeline stages."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        # tl.dot wants 16 at least; gate_up splits block_n into gate and up halves.
        for name, least in (("block_m", 16), ("block_n", 32), ("block_k", 16)):
            value = getattr(self, name)
            if value < least or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= {least}, "
                                 f"got {value}")
        for name in ("group_m", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"TileConfig.{name} must be >= 1, got {getattr(self, name)}")

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def config_key(num_experts: int, ffn: int, hidden: int, dtype: str, device: str) -> str:
    """The file stem that holds tiles for experts [E, 2F, D] / [E, D, F] in `dtype` on
    `device` (`dtype` as torch names it without the `torch.` prefix)."""
    return (f"E={num_experts},N={ffn},K={hidden},dtype={dtype.removeprefix('torch.')},"
            f"device={device.replace(' ', '_')}")


@functools.cache
def load_configs(key: str, config_dir: Path = CONFIG_DIR) -> dict[int, TileConfig] | None:
    """Token count -> tiles from `<key>.json`, or None when there is no such file."""
    path = config_dir / f"{key}.json"
    if not path.is_file():
        return None
    raw: dict[str, Any] = json.loads(path.read_text())
    return {int(m): TileConfig(**tiles) for m, tiles in raw["configs"].items()}


def default_config(num_tokens: int, num_experts: int, top_k: int, device: str) -> TileConfig:
    """Tiles for a shape nobody tuned, from the rows each expert sees on average."""
    if device == INTERPRETER:
        # The interpreter pays per program and per loop step, not per element.
        return TileConfig(block_m=16, block_n=32, block_k=32)
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 16:  # decode: weight streaming, few rows per tile
        return TileConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4,
                          num_stages=4)
    if rows_per_expert <= 128:
        return TileConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4,
                          num_stages=3)
    return TileConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8,
                      num_stages=3)


def get_config(num_experts: int, ffn: int, hidden: int, top_k: int, dtype: str, device: str,
               num_tokens: int, config_dir: Path = CONFIG_DIR) -> TileConfig:
    """The tiles for T = `num_tokens` through experts of this shape: the nearest token
    count in the matching file, else `default_config`."""
    table = load_configs(config_key(num_experts, ffn, hidden, dtype, device), config_dir)
    if not table:
        return default_config(num_tokens, num_experts, top_k, device)
    nearest = min(table, key=lambda m: (abs(m - num_tokens), m))
    return table[nearest]


def write_configs(path: Path, table: dict[int, TileConfig], source: str) -> None:
    """Write a token count -> tiles table in the format `load_configs` reads."""
    body = {"source": source,
            "configs": {str(m): table[m].to_json() for m in sorted(table)}}
    path.write_text(json.dumps(body, indent=2) + "\n")
    load_configs.cache_clear()
