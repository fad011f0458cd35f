"""Who may call the server and how much one request may make it allocate.

With an API key (``--api-key-file`` or ``ONNXPIPE_API_KEY``) every request but the health
probes needs ``Authorization: Bearer <key>`` (gRPC: the ``authorization`` metadata); the check
runs before the body is read, so a refused request never reaches a batcher or a worker. Without
a key the server binds to loopback only, unless the user says ``--insecure``.

Example:
    >>> authorized("Bearer s3cret", "s3cret"), authorized("Bearer nope", "s3cret"), authorized(None, None)
    (True, False, True)
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import os
from pathlib import Path

from onnxpipe.core.errors import InputError

ENV_KEY = "ONNXPIPE_API_KEY"
# paths an orchestrator probes without credentials (Kubernetes liveness/readiness)
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
OPEN_RPCS = frozenset({"ServerLive", "ServerReady"})


def load_api_key(path: str | os.PathLike | None, env: dict[str, str] | None = None) -> str | None:
    """The API key from ``path`` (its first line), else from ``ONNXPIPE_API_KEY``, else None.

    Raises:
        InputError: the file is missing, unreadable or empty, or the key is too short to guess hard.
    """
    env = os.environ if env is None else env
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot read the API key file {path}: {exc.strerror or exc}",
                             hint="give a file holding the key on its first line") from None
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        origin = str(path)
    else:
        key = env.get(ENV_KEY, "").strip()
        origin = ENV_KEY
        if not key:
            return None
    if len(key) < 16:
        raise InputError(f"the API key in {origin} has {len(key)} characters; at least 16 are needed",
                         hint="e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > key.txt")
    return key


def authorized(header: str | None, key: str | None) -> bool:
    """Whether an ``Authorization`` header (or gRPC metadata value) carries ``key`` (always, without a key)."""
    if key is None:
        return True
    if not header or header[:7].lower() != "bearer ":
        return False
    return hmac.compare_digest(header[7:].strip().encode(), key.encode())


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost).

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0"), is_loopback("localhost")
        (True, False, True)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_bind(host: str, key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond loopback without an API key, unless ``insecure``.

    Raises:
        InputError: ``host`` is not loopback, no key is set and ``insecure`` is False.
    """
    if key is None and not insecure and not is_loopback(host):
        raise InputError(f"--host {host} makes the server reachable from other machines, and no API key is set",
                         hint=f"give --api-key-file (or set {ENV_KEY}), or --insecure if the network is trusted")


def tensor_bytes(shape: list[int], itemsize: int, limit: int, name: str) -> int:
    """Bytes a tensor of ``shape`` takes; the one place a request's size is bounded before anything is allocated.

    Raises:
        ProtocolError: the tensor would take more than ``limit`` bytes (413).

    Example:
        >>> tensor_bytes([2, 3], 4, 1 << 20, "x")
        24
    """
    from onnxpipe.serve.protocol import ProtocolError

    size = math.prod(shape) * max(1, itemsize)
    if size > limit:
        raise ProtocolError(413, f"input {name!r}: shape {shape} takes {size} bytes, over the limit of {limit} bytes "
                                 "per request")
    return size
