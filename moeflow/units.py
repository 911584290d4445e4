"""Memory sizes as people write them: `512KB`, `2GB` (powers of 1000), `180GiB` (of 1024),
`4096` (bytes)."""

from __future__ import annotations

import math
import re

_UNITS = {"": 1.0, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 1024.0, "mib": float(1 << 20), "gib": float(1 << 30), "tib": float(1 << 40)}


def parse_bytes(text: str | float) -> float:
    """'192GB' (1e9 B each), '180GiB' (2^30 B each) or '4096' (bytes) to bytes; a number
    is bytes. Finite, or a ValueError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text):
            raise ValueError(f"not a memory size: {text!r}")
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text) if isinstance(
        text, str) else None
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r}; write e.g. 512KB, 2GB, 180GiB or a "
                         f"number of bytes")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]
