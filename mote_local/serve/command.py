"""`mote serve`: the click command (registered on the `mote` group by mote_local.cli.commands)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import click

__all__ = ["serve_command"]

_OWN_HELP = """\
Usage: mote serve MODEL [--profile NAME=FILE]… [--force-profile] [LLAMA-SERVER FLAGS…]

  Serve MODEL with llama.cpp's llama-server, built with mote-local's engine: every request may carry
  its own expert steering ("steering") and ask for its routing ("return_routing", "routing_detail")
  on /completion, /v1/completions, /v1/chat/completions, /v1/messages and /v1/responses.

Options of mote serve:
  --profile NAME=FILE  A steering profile (JSON or GGUF) requests may name ("steering": {"profile":
                       NAME}); checked against MODEL before the server starts; repeatable.
  --force-profile      Load profiles made for another model anyway.
  --help               Show this message and llama-server's options.

Every other flag is llama-server's (below), passed on verbatim; --rpc servers are checked first.
"""


@click.command(
    "serve", add_help_option=False, context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.argument("server_args", nargs=-1, type=click.UNPROCESSED)
def serve_command(model: Path | None, server_args: tuple[str, ...]) -> None:
    """Serve MODEL with llama-server; every request may steer its own experts and ask for its routing."""
    from mote_local.serve.launcher import prepare, server_binary

    args = list(server_args)
    if model is None or str(model) in ("--help", "-h") or "--help" in args or "-h" in args:
        click.echo(_OWN_HELP)
        click.echo("llama-server's options:\n")
        help_text = subprocess.run([str(server_binary()), "--help"], capture_output=True, text=True)
        click.echo(help_text.stdout or help_text.stderr)
        return
    profiles, force = [], False
    rest = []
    i = 0
    while i < len(args):  # mote serve's own options; everything else is the server's
        if args[i] == "--profile":
            if i + 1 >= len(args):
                raise click.UsageError("--profile needs NAME=FILE")
            profiles.append(args[i + 1])
            i += 2
            continue
        if args[i].startswith("--profile="):
            profiles.append(args[i].removeprefix("--profile="))
        elif args[i] == "--force-profile":
            force = True
        else:
            rest.append(args[i])
        i += 1
    launch = prepare(model, profiles, rest, force_profiles=force)
    if launch.profiles:
        click.echo(f"mote serve: profiles {', '.join(launch.profiles)}", err=True)
    os.environ.update(launch.env)
    # a client that leaves while the server answers must not kill it; the server becomes this process,
    # so its signals (SIGINT, SIGTERM: llama-server's clean shutdown) and exit status are the command's
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    os.execv(launch.argv[0], launch.argv)
