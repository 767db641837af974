"""Whether the Hugging Face Hub can be reached, found out in seconds before a Hub name is loaded.

Without ``HF_HUB_OFFLINE``, the Hub client retries an unreachable Hub for about half a minute (five tries with
back-off) and then prints two lines. A name that is no local folder is therefore probed first with one TCP connect
to the Hub's endpoint (``HF_ENDPOINT``, or the proxy that ``HTTPS_PROXY`` names) under a short timeout: when that
fails, a name the Hub cache holds is read from the cache (offline mode is switched on for this process), and any
other is a one-line `UsageError`.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from .errors import UsageError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0


def _probe_address() -> tuple[str, int, str]:
    """(host, port, what) of the first connection a Hub request makes: the proxy if one is set, else the endpoint."""
    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    proxy = os.environ.get("HTTPS_PROXY" if endpoint.scheme == "https" else "HTTP_PROXY") or os.environ.get(
        "https_proxy" if endpoint.scheme == "https" else "http_proxy"
    )
    target = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}") if proxy else endpoint
    port = target.port or (443 if target.scheme == "https" else 80)
    return target.hostname or "", port, f"the proxy {proxy}" if proxy else f"the Hub ({constants.ENDPOINT})"


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be reached (None when a TCP connection to it opens within ``timeout`` seconds)."""
    host, port, what = _probe_address()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return f"{what} cannot be reached ({host}:{port}: {reason})"
    return None


def _dataset_cached(name: str) -> bool:
    """Whether the Hub cache or the default `datasets` cache holds anything of the Hub dataset ``name`` (read
    from the environment, so that checking a corpus spec does not import `datasets`)."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return hub.is_dir() or (prepared / name.replace("/", "___")).is_dir()


def _cached(name: str, filename: str, repo_type: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    if repo_type == "dataset":
        return _dataset_cached(name)
    return isinstance(try_to_load_from_cache(name, filename, repo_type=repo_type), str)


def check_hub_name(name: str, what: str, filename: str = "config.json", repo_type: str = "model") -> None:
    """Before ``name`` (a Hub id that is no local folder) is loaded: raise a one-line `UsageError` when the Hub
    cannot be reached and the Hub cache does not hold ``filename`` of it (a dataset, ``repo_type="dataset"``:
    anything of it, in the Hub cache or the `datasets` cache). With the Hub unreachable and the name cached, offline
    mode is switched on, so the cache is read at once rather than after the client's retries.

    Nothing is probed in offline mode (``HF_HUB_OFFLINE=1``), where the Hub client fails fast on its own."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    reason = hub_unreachable()
    if reason is None:
        return
    if _cached(name, filename, repo_type):
        logger.warning("%s; reading %s from the Hub cache (offline mode)", reason, name)
        constants.HF_HUB_OFFLINE = True  # read at each call by huggingface_hub and transformers
        os.environ["HF_HUB_OFFLINE"] = "1"  # and by the libraries and processes that read the environment
        return
    raise UsageError(
        f"{what}: {name!r} is no local folder, and {reason}; check the path, or your network (with "
        "HF_HUB_OFFLINE=1 only the Hub cache is read)."
    )


__all__ = ["PROBE_TIMEOUT_S", "check_hub_name", "hub_unreachable"]
