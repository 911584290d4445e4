"""Execution on devices: the worker that runs graph nodes with real ops, the in-process
executor, and the actor runtime over ZeroMQ."""
