"""Memory sizes as people write them: `512KB`, `2GB` (powers of 1000), `180GiB` (of 1024)."""

from __future__ import annotations

import re

_UNITS = {"b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 1024.0, "mib": float(1 << 20), "gib": float(1 << 30), "tib": float(1 << 40)}


def parse_bytes(text: str | float) -> float:
    """'192GB' (1e9 B each) or '180GiB' (2^30 B each) to bytes; a number is bytes."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r}; write e.g. 512KB, 2GB or 180GiB")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]
