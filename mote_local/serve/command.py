"""`mote serve`: the click command (registered on the `mote` group by mote_local.cli.commands).

Importing this module is cheap: the web stack is imported when the command runs.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import click

from mote_local.errors import MoteError

__all__ = ["serve_command", "run_server"]


@click.command("serve")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", "profiles", multiple=True, metavar="NAME=FILE",
              help="A steering profile requests may name (\"steering\": {\"profile\": NAME}); repeatable.")
@click.option("--force-profile", is_flag=True, help="Load profiles made for another model anyway.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (the default serves this machine only).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--parallel", "-np", type=int, default=4, show_default=True,
              help="Requests decoded together (sequence slots); each holds ctx-size / parallel positions.")
@click.option("--ctx-size", "-c", type=int, default=4096, show_default=True,
              help="The whole context, shared by the slots.")
@click.option("--batch-size", "-b", type=int, default=512, show_default=True, help="Tokens per decode call.")
@click.option("--n-gpu-layers", "-ngl", type=click.IntRange(min=0), default=None,
              help="Layers to offload to the GPUs and rpc servers (default: 0; every layer with --rpc).")
@click.option("--rpc", "rpc_servers", metavar="HOST:PORT[,…]", default=None,
              help="Spread the offloaded layers over `mote rpc-server`s.")
@click.option("--tensor-split", "-ts", metavar="P,P[,…]", default=None,
              help="Offloaded layers per device, in proportion: the --rpc servers in order, then local GPUs.")
@click.option("--threads", "-t", type=int, default=None, help="CPU threads (default: all).")
@click.option("--api-key", envvar="MOTE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (or set MOTE_API_KEY).")
@click.option("--alias", default=None, help="The model id clients see (default: the file's name).")
@click.option("--max-queue", type=int, default=256, show_default=True,
              help="Requests waiting for a slot before new ones get HTTP 503.")
@click.option("--verbose", is_flag=True, help="Show llama.cpp's log and every request.")
def serve_command(model: Path, profiles, force_profile: bool, host: str, port: int, parallel: int, ctx_size: int,
                  batch_size: int, n_gpu_layers: int | None, rpc_servers: str | None, tensor_split: str | None,
                  threads: int | None, api_key: str | None, alias: str | None, max_queue: int, verbose: bool) -> None:
    """Serve MODEL with an OpenAI-compatible API in which every request can steer its own experts."""
    from mote_local.engine.rpc import placement
    from mote_local.serve.settings import Settings, parse_profile_option

    settings = Settings(model=model, profiles=parse_profile_option(profiles), force_profiles=force_profile,
                        host=host, port=port, parallel=parallel, n_ctx=ctx_size, n_batch=batch_size,
                        placement=placement(n_gpu_layers, rpc_servers, tensor_split), n_threads=threads,
                        api_key=api_key, alias=alias, max_queue=max_queue, verbose=verbose)
    run_server(settings, announce=lambda text: click.echo(text, err=True))


def run_server(settings, *, sock: socket.socket | None = None, announce=None) -> None:
    """Loads the model, serves until SIGINT/SIGTERM, then stops the engine and frees it."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise MoteError(f"mote serve needs {err.name}: pip install 'mote-local[serve]'") from None

    from mote_local.serve.app import Backend, create_app

    with Backend(settings) as backend:
        app = create_app(backend)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info" if settings.verbose
                                else "warning", access_log=settings.verbose, timeout_graceful_shutdown=5,
                                lifespan="on")
        server = _Server(config, backend)
        if sock is None:
            sock = _bind(settings.host, settings.port)
        if announce is not None:
            host, port = sock.getsockname()[:2]
            announce(f"mote serve: {settings.model_id} ({backend.layout.arch}, {backend.scheduler.session.n_seq_max} "
                     f"slots of {backend.scheduler.slot_ctx} tokens, profiles: "
                     f"{', '.join(backend.profiles) or 'none'}) on http://{host}:{port}/v1")
        server.run(sockets=[sock])
    if announce is not None:
        announce("mote serve: stopped")


def _bind(host: str, port: int) -> socket.socket:
    from mote_local.errors import InputError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(2048)  # connections wait in the backlog from now on, before uvicorn accepts them
    return sock


def _Server(config, backend):
    """uvicorn's server, told to fail the running requests as soon as a shutdown signal arrives (so that
    streams end now instead of holding the shutdown until their last token)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            # uvicorn would re-raise the signal after shutting down (SIGTERM's default action kills the process
            # before the engine is freed); here the shutdown is the signal's whole effect, and the exit is 0
            backend.scheduler.stop(timeout=0)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for connections
            self.should_exit = True

    return Server(config)
