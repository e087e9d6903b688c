"""Whether the Hugging Face hub can be asked at all: offline switches and a quick reachability test.

Models (fastsae.model.sources) and released SAEs (fastsae.formats.releases) both look in the local
Hugging Face cache first and ask this module before going to the hub, so a machine without the hub
gets one line saying so instead of the hub client's retries (about 25 s) and traceback.
"""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_host() -> str:
    """The hub's host name (HF_ENDPOINT's, default huggingface.co)."""
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def offline_variable() -> str | None:
    """The offline switch that is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), None if neither."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def hub_unavailable_reason(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be asked now ("HF_HUB_OFFLINE is set", "huggingface.co is not reachable
    (...)"), or None when it can: no offline switch is on and a TCP connection to its port 443
    opens within ``timeout`` seconds."""
    switch = offline_variable()
    if switch is not None:
        return f"{switch} is set"
    import socket

    host = hub_host()
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        return f"{host} is not reachable ({error})"
    return None
