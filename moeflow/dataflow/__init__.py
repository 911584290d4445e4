"""The dataflow graph: node kinds, units, placement, `compile` and rendering.

Pure: nothing here imports asyncio, zmq, torch devices or does I/O beyond `render`'s file
writing helpers.
"""

from moeflow.dataflow.compiler import Cut, compile, split_groups
from moeflow.dataflow.graph import (
    NODE_KINDS,
    Attention,
    Combine,
    Edge,
    Embed,
    Expert,
    Gate,
    Graph,
    GraphError,
    LMHead,
    Node,
    Placement,
    SeqChunk,
    Transfer,
    Unit,
)

__all__ = [
    "NODE_KINDS", "Attention", "Combine", "Cut", "Edge", "Embed", "Expert", "Gate", "Graph",
    "GraphError", "LMHead", "Node", "Placement", "SeqChunk", "Transfer", "Unit", "compile",
    "split_groups",
]
