"""Serving: the engine core, the Python APIs, the request server and client, the CLI."""
