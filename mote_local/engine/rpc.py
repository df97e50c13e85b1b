"""Several machines: a model's layers on llama.cpp rpc-servers.

    mote rpc-server --host 0.0.0.0 --port 50052          # on each remote host
    Model("model.gguf", rpc_servers=["10.0.0.2:50052", "10.0.0.3:50052"], n_gpu_layers=99)

Steering and capture need nothing else: the steering tables are graph inputs and the routing taps graph
outputs, which llama.cpp's scheduler copies to and from whichever backend computes a layer.

What this module adds to llama.cpp's RPC client: endpoints are checked before the engine sees them (a
missing, busy or incompatible server aborts llama.cpp's client), a model's devices are exactly its own
servers' (they are never registered with ggml, whose default device selection would give them to every
later model of the process), and a server that dies is reported per endpoint by the engine instead of
aborting the process (`lost_since`).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from mote_local import binding
from mote_local.errors import EngineError, InputError

DEFAULT_PORT = 50052
# A server answers its greeting at once; no answer within this means it is busy with another client
# (an rpc-server serves one at a time) or unreachable.
PROBE_TIMEOUT_MS = 5000
ALL_LAYERS = 999  # n_gpu_layers that offloads every layer and the output

_ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")

_lock = threading.Lock()
_in_use: Counter[str] = Counter()  # endpoint -> open models of this process on it


def parse_endpoints(servers: str | Sequence[str]) -> list[str]:
    """HOST:PORT endpoints from a list or a comma-separated string, validated; duplicates refused."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    endpoints = [str(item).strip() for item in items if str(item).strip()]
    if isinstance(servers, str) and not endpoints:
        raise InputError("--rpc needs HOST:PORT[,HOST:PORT…] (e.g. 192.168.1.10:50052)")
    for endpoint in endpoints:
        m = _ENDPOINT.match(endpoint)
        if m is None or not 1 <= int(m.group(2)) <= 65535:
            raise InputError(
                f"rpc server {endpoint!r} is not HOST:PORT with a port in 1-65535 (e.g. 192.168.1.10:{DEFAULT_PORT})"
            )
    duplicates = sorted(e for e, n in Counter(endpoints).items() if n > 1)
    if duplicates:
        raise InputError(f"rpc server {duplicates[0]} is listed twice: give each server once")
    return endpoints


def probe(endpoint: str, timeout_ms: int = PROBE_TIMEOUT_MS) -> None:
    """Raises EngineError, naming the problem and the fix, unless an rpc-server answers at endpoint (a
    server busy with another client does not answer)."""
    binding.rpc_probe(endpoint, timeout_ms)


def parse_tensor_split(values: str) -> list[float]:
    """-ts's proportions from a comma list."""
    try:
        return [float(v) for v in values.split(",")]
    except ValueError:
        raise InputError(
            f"--tensor-split takes proportions such as 3,1 (one per device: the rpc servers in "
            f"order, then local GPUs), got {values!r}"
        ) from None


def offloaded_layers(n_gpu_layers: int | None, endpoints: Sequence[str]) -> int:
    """-ngl, whose default is 0 on this machine and every layer with rpc servers."""
    if n_gpu_layers is None:
        return ALL_LAYERS if endpoints else 0
    return n_gpu_layers


def attach(endpoints: list[str]):
    """Connects a model about to load to its servers; returns llama_model_params.devices for it, or None
    (no servers: llama.cpp's default, which never sees them). Pair with `detach`."""
    if not endpoints:
        return None
    with _lock:
        for endpoint in endpoints:
            # a server serves one client: this process's open connection to it (shared by its models)
            # would make a new greeting wait, so only a server nobody here uses yet is asked first
            if _in_use[endpoint] == 0:
                probe(endpoint)
            binding.rpc_add_server(endpoint)
        _in_use.update(endpoints)
        return binding.rpc_model_devices(endpoints)


def detach(endpoints: list[str]) -> None:
    with _lock:
        for endpoint in endpoints:
            _in_use[endpoint] -= 1


def lost_replies(endpoints: list[str]) -> dict[str, int]:
    return {endpoint: binding.rpc_lost_replies(endpoint) for endpoint in endpoints}


def lost_since(baseline: dict[str, int]) -> list[str]:
    """Endpoints that lost replies since `baseline` (from `lost_replies`): their server died or the
    connection broke."""
    return [endpoint for endpoint, n in baseline.items() if binding.rpc_lost_replies(endpoint) > n]


def bundled_binary(name: str, what: str) -> Path:
    """A program the build installed beside the engine (``mote_local_engine/bin/NAME``, linked to the same
    libraries); ``what`` names it in the error when it is missing."""
    path = Path(str(resources.files("mote_local_engine"))) / "bin" / name
    if not path.is_file():
        raise EngineError(
            f"the engine has no {what} ({path} is missing): reinstall mote-local with "
            "`pip install .` so that the build adds it"
        )
    return path


def server_binary() -> Path:
    """llama.cpp's rpc-server as this package built it."""
    return bundled_binary("mote-rpc-server", "rpc-server")


def server_command(host: str, port: int, threads: int | None = None) -> list[str]:
    """The command line of an rpc-server (the CPU of this host) listening on host:port."""
    command = [str(server_binary()), "--host", host, "--port", str(port)]
    if threads is not None:
        command += ["--threads", str(threads)]
    return command
