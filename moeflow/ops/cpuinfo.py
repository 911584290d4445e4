"""This CPU's model name and feature flags, read once from /proc/cpuinfo (where there is
one): what the kernel choice and the decode attention's widening go by."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path


@cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags); the flags are empty where /proc/cpuinfo is not readable."""
    model, flags = platform.processor(), frozenset[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", "x86_64"):
                model = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
                break
    except OSError:
        pass
    return model, flags
