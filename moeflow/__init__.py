"""moeflow: a dataflow runtime for serving Mixture-of-Experts language models.

The top-level names load lazily, so `import moeflow.scheduler` (pure) never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "moeflow.serve.llm",
    "Completion": "moeflow.serve.llm",
    "SamplingParams": "moeflow.ops.sampling",
    "EngineConfig": "moeflow.serve.config",
    "AsyncEngine": "moeflow.serve.async_engine",
    "TokenEvent": "moeflow.serve.async_engine",
    "FinalEvent": "moeflow.serve.async_engine",
    "OverloadedError": "moeflow.serve.async_engine",
    "Client": "moeflow.serve.client",
    "AsyncClient": "moeflow.serve.client",
}

__all__ = sorted(_LAZY)


def lazy_names(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `table[name]` (a module path) on first use of
    `name`, so that importing `package` imports none of them."""

    def getattr_(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        import importlib

        return getattr(importlib.import_module(module), name)

    return getattr_


__getattr__ = lazy_names("moeflow", _LAZY)
