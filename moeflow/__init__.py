"""moeflow: a dataflow runtime for serving Mixture-of-Experts language models.

The top-level names load lazily, so `import moeflow.scheduler` (pure) never imports torch.
"""

from __future__ import annotations

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moeflow' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
