"""`mote quantize`: the click command (registered on the `mote` group by mote_local.cli.commands).

The logic lives in mote_local.modelfile.quantize; this module only parses flags and prints.
"""

from __future__ import annotations

from pathlib import Path

import click

from mote_local.cli.options import threads_option
from mote_local.errors import MoteError
from mote_local.modelfile.quantize import RECIPES, quantize, routing_class

__all__ = ["quantize_command"]


@click.command("quantize")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--recipe",
    type=click.Choice(list(RECIPES)),
    default="capture",
    show_default=True,
    help="Per-tensor types: capture, capture-q8, capture-q4 = routed experts Q6_K, Q8_0, Q4_K with the "
    "output Q8_0 and everything else F16 (capture: the smallest measured to keep routing); q8_0 = "
    "everything Q8_0. Routers and norms stay unquantized.",
)
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@threads_option
@click.option("--verbose", is_flag=True, help="Show llama.cpp's log.")
def quantize_command(src: Path, dst: Path, recipe: str, force: bool, threads: int | None, verbose: bool) -> None:
    """Quantize the higher-precision (F32/F16/BF16) MoE GGUF SRC into DST with per-tensor types that keep
    routing close to the original's (for fTRI and steering), through llama.cpp's own quantizer."""
    try:
        if verbose:
            from mote_local.binding import set_verbose

            set_verbose(True)
        result = quantize(src, dst, recipe, force=force, threads=threads or 0)
        cls = routing_class(result.tensor_types)
    except MoteError as err:
        raise click.ClickException(str(err)) from None
    groups = ", ".join(f"{g} {t}" for g, t in result.types.items())
    click.echo(f"wrote {result.path} ({result.size_bytes / 2**20:,.1f} MiB, recipe {recipe}): {groups}")
    click.echo(cls.text)
