"""Serving: an Open Inference Protocol (KServe v2) server with dynamic batching, and Triton repository export.

The server needs ``aiohttp``; import :mod:`onnxpipe.serve.server` only where it is wanted.

Floor: stands on :mod:`onnxpipe.runtimes` and below; only the CLI imports it.
"""
