"""Serving an export: the Triton model repository and the HTTP server (the `serve` extra)."""
