"""The `mote` command line: a thin click group, one verb per subcommand.

Flags follow llama.cpp habits (-m, -p, -n, --temp, -ngl, -c, …); the model-loading ones are declared once, in
mote_local.cli.options.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from mote_local.cli.options import (
    context_for,
    model_options,
    open_model,
    sampling_options,
    threads_option,
)
from mote_local.engine.options import ModelOptions, require_fit
from mote_local.errors import MoteError
from mote_local.modelfile.layout import MoeLayout, read_layout
from mote_local.prompts import Prompt
from mote_local.steering.entries import Scope
from mote_local.steering.spec import SPEC_KINDS


class OneLineUsageError(click.UsageError):
    """A usage error (a bad flag or value) shown as one line that points to --help, not the whole usage text."""

    def show(self, file=None) -> None:
        where = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"Error: {self.format_message()}{where}", file=file, err=file is None)


class MoteGroup(click.Group):
    """Turns mote-local's errors and bad flags into one-line messages and a non-zero exit, never a traceback."""

    group_class = type  # subgroups (mote profile) behave alike

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise  # `mote profile` alone prints its help
        except click.UsageError as err:
            raise OneLineUsageError(err.format_message(), err.ctx) from None
        except MoteError as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:  # disk full, permission denied on --out, …
            where = f"{err.filename}: " if err.filename and str(err.filename) not in str(err.strerror) else ""
            raise click.ClickException(f"{where}{err.strerror or err}") from None


@click.group(cls=MoteGroup)
@click.version_option(package_name="mote-local")
def main() -> None:
    """See and tune the experts inside Mixture-of-Experts models (GGUF, llama.cpp)."""


def steering_options(f):
    for kind, help_text in (
        ("off", "switch experts off (mask: the slot goes to the next-best expert)"),
        ("drop", "drop experts' weight (served by k-1 experts, the paper's switch-off)"),
        ("force", "force experts on"),
        ("bias", "router-logit bias, LAYER:EXPERT=VALUE"),
        ("gain", "scale experts' output, LAYER:EXPERT=GAIN"),
    ):
        f = click.option(f"--{kind}", multiple=True, metavar="L:E[,L:E…]", help=help_text.capitalize() + ".")(f)
    f = click.option(
        "--profile",
        "profiles",
        multiple=True,
        type=click.Path(path_type=Path),
        help="Steering profile (.json or .gguf); repeatable, composed.",
    )(f)
    f = click.option("--strength", type=float, default=None, help="Scale every bias (default: the profile's).")(f)
    f = click.option(
        "--scope",
        type=click.Choice([s.value for s in Scope]),
        default=None,
        help="When the command-line entries apply (default: all).",
    )(f)
    f = click.option("--force-profile", is_flag=True, help="Apply profiles made for another model anyway.")(f)
    return f


def build_profile(
    layout: MoeLayout,
    profiles: Sequence[Path],
    specs: dict[str, Sequence[str]],
    strength: float | None,
    scope: str | None,
    force: bool,
):
    """The composition of the profile files and the command-line entries, validated for the model; a profile
    file made for another model only with ``force`` (--force-profile)."""
    from mote_local.cli.shared import load_profile
    from mote_local.steering.profile import compose
    from mote_local.steering.spec import parse_spec

    entries = [e for kind in SPEC_KINDS for text in specs.get(kind, ()) for e in parse_spec(kind, text)]
    return compose(
        [(str(path), load_profile(path)) for path in profiles],
        entries,
        layout,
        strength=strength,
        scope=scope,
        force=force,
        way_out="pass --force-profile",
    )


@main.command()
@model_options(chat=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--super-experts",
    is_flag=True,
    help="Also find experts whose removal alone collapses the model on neutral text (cached).",
)
@click.option(
    "--text",
    type=click.Path(path_type=Path),
    default=None,
    help="Neutral text for --super-experts (default: the packaged one).",
)
def inspect(model: Path, options: ModelOptions, as_json: bool, super_experts: bool, text: Path | None) -> None:
    """Describe MODEL's experts: architecture, MoE layers, experts, top-k, gating, quantization."""
    layout = read_layout(model)
    n_ctx = context_for(layout, options)
    threads = options.load.n_threads
    if super_experts:
        from mote_local.evaluation.super_experts import find_super_experts

        with contextlib.ExitStack() as stack:
            target = layout.require_moe().path  # a cached result needs no model
            if options.load != ModelOptions().load or options.context != ModelOptions().context:
                target = stack.enter_context(open_model(target, options, chat=False))
            found = find_super_experts(target, text, n_threads=threads)
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "super_experts": found.flagged,
                        "median_kl": found.median,
                        "factor": found.factor,
                        "floor": found.floor,
                    },
                    indent=2,
                )
            )
            return
        click.echo(
            f"super-experts of {layout.path.name} (KL on neutral text when switched off alone; "
            f"median expert {found.median:.2g} nats; flagged above {found.factor:g}x the median "
            f"and {found.floor:g} nats):"
        )
        for layer, expert in found.flagged:
            click.echo(f"  layer {layer} expert {expert}: KL {found.kl[layer, expert]:.3g} nats")
        if not found.flagged:
            click.echo("  none")
        return
    if not layout.is_moe:
        if as_json:
            click.echo(
                json.dumps(
                    {"path": str(layout.path), "arch": layout.arch, "n_layer": layout.n_layer, "moe_layers": []},
                    indent=2,
                )
            )
        else:
            click.echo(f"{layout.path.name}: {layout.arch}, {layout.n_layer} layers, dense (no experts)")
        return
    # what the engine's graph does, asked of the engine (GGUF keys can be absent or overridden by the graph)
    with open_model(layout.path, options, chat=False) as m:
        routers = m.routers
    moe = [i for i, r in enumerate(routers) if r.n_calls]
    first = routers[moe[0]] if moe else None
    calls_per_layer = max((r.n_calls for r in routers), default=0)
    info = {
        "path": str(layout.path),
        "arch": layout.arch,
        "n_layer": layout.n_layer,
        "moe_layers": moe,
        "n_expert": layout.n_expert,
        "n_expert_used": first.n_expert_used if first else layout.n_expert_used,
        "gating": first.gating if first else None,
        "norm_weights": first.norm_w if first else None,
        "weights_scale": first.w_scale if first else None,
        "selection_bias": first.selection_bias if first else None,
        "router_calls_per_layer": calls_per_layer,
        "n_shared_experts": layout.n_shared_experts,
        "n_expert_groups": layout.n_expert_groups,
        "n_group_used": layout.n_group_used,
        "quantization": layout.file_type,
        "size_bytes": layout.size_bytes,
        "n_ctx_train": layout.context_length,
        "n_ctx": n_ctx,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if first is None:
        click.echo(
            f"{layout.path.name}: {layout.arch}, {layout.n_layer} layers, {layout.n_expert} experts per "
            "layer in the file, but the engine's graph routes no token through them: nothing to steer or "
            "capture"
        )
        return
    groups = f", {layout.n_expert_groups} groups ({layout.n_group_used} used)" if layout.n_expert_groups > 1 else ""
    weights = ("normalised" if first.norm_w else "raw") + (f", scaled x{first.w_scale:g}" if first.w_scale != 1 else "")
    rows = [
        ("model", layout.path.name),
        ("arch", layout.arch),
        ("layers", f"{layout.n_layer} ({len(moe)} MoE: {_span(moe)})"),
        ("experts", f"{layout.n_expert} per layer, top-{first.n_expert_used}{groups}"),
        ("gating", f"{first.gating}{' + selection bias' if first.selection_bias else ''}, top-k weights {weights}"),
        ("shared experts", str(layout.n_shared_experts)),
        ("quantization", layout.file_type),
        ("size", f"{layout.size_bytes / 2**20:.1f} MiB"),
        ("total experts", str(layout.n_expert * len(moe))),
        ("context", f"{n_ctx} (-c; trained on {layout.context_length or 'an unknown number of'} tokens)"),
    ]
    if calls_per_layer > 1:
        rows.insert(
            4,
            (
                "router calls",
                f"{info['router_calls_per_layer']} per layer (steering's drop and gain, and capture, act on the first)",
            ),
        )
    for k, v in rows:
        click.echo(f"{k:>15}  {v}")


def warn_super_experts(
    model, profile, profiles: Sequence[Path], specs: dict[str, Sequence[str]], threads: int | None
) -> None:
    """Warns, naming the flag or the profile file, when the steering switches off a super-expert (checked on
    the model: no earlier `mote inspect --super-experts` needed)."""
    from mote_local.cli.shared import super_expert_note, super_experts_off
    from mote_local.steering.entries import off_experts
    from mote_local.steering.spec import parse_spec

    check = super_experts_off(model, profile, threads)
    for layer, expert in check.flagged:
        origin = next(
            (
                f"--{kind} {text}"
                for kind in SPEC_KINDS
                for text in specs.get(kind, ())
                if (layer, expert) in off_experts(parse_spec(kind, text), profile.strength)
            ),
            "the profile " + ", ".join(map(str, profiles)),
        )
        click.echo(
            f"warning: {origin} switches off layer {layer} expert {expert}, "
            f"{super_expert_note(model, check, layer, expert)}: the model may collapse",
            err=True,
        )


MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: sequences in one context
MAX_BOOTSTRAP = 10_000  # replicates × layers × experts floats are held at once
INTERRUPTED = 130  # the exit status of a run that Ctrl-C cut short (the shell's 128 + SIGINT)


def output_directory(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """--out names a directory (created if missing); a file there is refused before any work starts."""
    if value is not None and value.exists() and not value.is_dir():
        raise click.BadParameter(
            f"{value} is a file; {param.opts[0]} names a directory for the output files (created if missing)",
            ctx,
            param,
        )
    return value


def _span(layers: Sequence[int]) -> str:
    return (
        f"{layers[0]}..{layers[-1]}"
        if list(layers) == list(range(layers[0], layers[-1] + 1))
        else ",".join(map(str, layers))
    )


@main.command()
@model_options(chat=True)
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option(
    "--n-predict",
    "-n",
    type=click.IntRange(min=-1),
    default=64,
    show_default=True,
    help="Tokens to generate (-1: until the end of generation, bounded by the context).",
)
@sampling_options
@click.option("--chat/--raw", "chat", default=False, help="Wrap the prompt in the model's chat template.")
@click.option("--compare", is_flag=True, help="Print the unsteered and the steered output for the same seed.")
@steering_options
def run(
    model: Path,
    options: ModelOptions,
    prompt: str,
    n_predict: int,
    sampling,
    chat: bool,
    compare: bool,
    profiles,
    strength,
    scope,
    force_profile,
    **specs,
) -> None:
    """Generate from MODEL with experts switched off, forced on, biased or scaled."""
    from mote_local.cli.shared import tokens_to_generate

    layout = read_layout(model).require_moe()
    n_ctx = context_for(layout, options)
    profile = build_profile(layout, profiles, specs, strength, scope, force_profile)
    if n_predict == 0:
        click.echo("nothing generated: -n 0 asks for no tokens (-n -1 generates until the end)", err=True)
        return
    with open_model(model, options, chat=chat) as m, m.session(n_ctx=n_ctx) as s:
        if profile is not None:
            warn_super_experts(m, profile, profiles, specs, options.load.n_threads)
        tokens = m.prompt_tokens(prompt, chat=chat)
        generate = dict(max_tokens=tokens_to_generate(n_predict, s.n_ctx), **sampling.generate_kwargs())
        if compare:
            plain = s.generate(tokens, **generate)
        if profile is not None:
            s.steer(profile, force=force_profile)
        out = s.generate(tokens, **generate)
    if compare:
        click.echo(click.style("unsteered:", bold=True) + plain.text)
        click.echo(click.style("steered:  ", bold=True) + out.text)
    else:
        click.echo(out.text)


@main.command()
@click.option(
    "--prompts",
    "prompts_file",
    required=True,
    type=click.Path(path_type=Path),
    help="Prompt set: a TOML/YAML file with classes, or a plain file (one prompt per line).",
)
@click.option(
    "--baseline-prompts",
    type=click.Path(path_type=Path),
    default=None,
    help="A plain file of baseline prompts (one per line); the behaviour class then comes from --prompts.",
)
@click.option("--behavior", default=None, help="Class that elicits the behaviour (default: the first).")
@click.option("--baseline", default=None, help="Baseline class (default: the second).")
@click.option(
    "--scope",
    type=click.Choice(["prompt", "target", "generated", "thinking"]),
    default="prompt",
    show_default=True,
    help="Which tokens count.",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    default=("mean_diff",),
    show_default=True,
    type=click.Choice(["mean_diff", "risk_diff", "log_odds", "weight_mass", "reap"]),
    help="Scoring method; repeatable (the first one makes the profile). reap weighs each routed token "
    "by gate weight x the expert's output norm.",
)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Experts in the ranking, and at most in the profile (only experts with evidence qualify).",
)
@click.option(
    "--sign",
    type=click.Choice(["positive", "negative", "abs"]),
    default="positive",
    show_default=True,
    help="Which experts the profile steers: more active on the behaviour (switched off), less active "
    "(forced on), or both.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="An expert qualifies when its interval lies wholly beyond ±THRESHOLD (0: excludes 0).",
)
@click.option(
    "--evidence",
    type=click.Choice(["simultaneous", "per-expert"]),
    default="simultaneous",
    show_default=True,
    help="The interval that must clear the threshold: the band over all experts at once, or each expert's own.",
)
@click.option(
    "--force-positive",
    is_flag=True,
    help="Force the experts more active on the behaviour on instead of switching them off.",
)
@click.option(
    "--graded",
    type=float,
    default=None,
    metavar="ALPHA",
    help="Export router biases b = -ALPHA x log odds ratio instead (scaled by --strength where used).",
)
@click.option(
    "--include-super-experts",
    is_flag=True,
    help="Let the profile steer experts flagged as super-experts (mote inspect --super-experts).",
)
@click.option(
    "--per-layer-cap", type=click.IntRange(min=1), default=None, help="At most this many profile experts per layer."
)
@click.option(
    "--off-mode",
    type=click.Choice(["drop", "mask"]),
    default="drop",
    show_default=True,
    help="How the profile switches off experts that fire more on the behaviour.",
)
@click.option(
    "--chat/--raw", "chat", default=True, show_default=True, help="Wrap prompts in the model's chat template."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("ftri-out"),
    show_default=True,
    callback=output_directory,
    help="Directory for ftri.json, the CSVs, heatmaps and profile.json.",
)
@click.option(
    "--parallel",
    "-np",
    "parallel",
    type=click.IntRange(1, MAX_SEQUENCES),
    default=32,
    show_default=True,
    help="Prompts decoded together, one sequence each (tokens per decode call: -b).",
)
@click.option(
    "--n-boot", type=click.IntRange(1, MAX_BOOTSTRAP), default=200, show_default=True, help="Bootstrap replicates."
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@model_options(chat=True)
def ftri(
    model: Path,
    options: ModelOptions,
    prompts_file: Path,
    baseline_prompts: Path | None,
    behavior,
    baseline,
    scope,
    methods,
    top: int,
    per_layer_cap,
    off_mode: str,
    chat: bool,
    out: Path,
    parallel: int,
    n_boot: int,
    seed: int,
    **export_options,
) -> None:
    """Find the experts of MODEL that fire differently on behaviour prompts than on baseline ones."""
    from mote_local.ftri.capture import run_ftri
    from mote_local.ftri.export import export_profile
    from mote_local.ftri.outputs import ranking_table, write_outputs
    from mote_local.prompts import combine, load_prompt_set, select_classes
    from mote_local.synthetic.planted import read_truth

    layout = read_layout(model).require_moe()
    n_ctx = context_for(layout, options)
    warn_quantization(layout)
    if baseline_prompts is None:
        prompt_set = load_prompt_set(prompts_file)
    else:  # the file's class is the baseline
        if baseline is not None:
            raise click.UsageError(
                "--baseline names a class of --prompts and --baseline-prompts gives a file of "
                "baseline prompts: give one of them"
            )
        names = load_prompt_set(baseline_prompts).names
        if len(names) != 1:
            raise click.UsageError(
                f"--baseline-prompts {baseline_prompts} has classes {', '.join(names)}: give a "
                "plain file (one prompt per line), or choose a class of --prompts with --baseline"
            )
        baseline = names[0]
        prompt_set = combine(prompts_file, baseline_prompts)
    behavior_prompts, baseline_set = select_classes(prompt_set, behavior, baseline)
    with open_model(model, options, chat=chat, capture=True) as m:
        run, results = run_ftri(
            m,
            behavior_prompts,
            baseline_set,
            methods=methods,
            scope=scope,
            chat=chat,
            top=top,
            n_boot=n_boot,
            seed=seed,
            batch_size=parallel,
            n_ctx=n_ctx,
            sign=export_options["sign"],
        )
        from mote_local.evaluation.super_experts import cached_super_experts
        from mote_local.ftri.stats import score

        graded = export_options["graded"] is not None
        export = export_profile(
            results[methods[0]],
            m,
            top=top,
            per_layer_cap=per_layer_cap,
            off_mode=off_mode,
            log_ratio=score(run.activations, "log_odds") if graded else None,
            super_experts=cached_super_experts(model) or (),
            metadata={
                "source": "mote ftri",
                "method": methods[0],
                "scope": scope,
                "prompts": str(prompts_file),
                "partial": run.partial,
            },
            **export_options,
        )
        ranked = export.chosen
        paths = write_outputs(out, run, results, m, top, per_layer_cap, export)
    try:
        planted = set(read_truth(model).planted)  # a planted model knows its answer
    except ValueError:
        planted = set()
    if run.partial:
        click.echo(f"interrupted: scored the {len(run.prompts)} prompts captured so far (marked partial)", err=True)
    click.echo(
        f"fTRI on {layout.path.name}: {run.activations.n_behavior} behaviour ({behavior_prompts[0].cls}) vs "
        f"{run.activations.n_baseline} baseline ({baseline_set[0].cls}) prompts, {scope} tokens"
    )
    for method in methods:
        click.echo(f"\n{method}:")
        click.echo(
            ranking_table(
                results[method],
                results[method].ranked(top, layers=layout.moe_layers),
                planted,
                threshold=export_options["threshold"],
                evidence=export_options["evidence"],
            )
        )
    click.echo("\n" + export.summary())
    if planted:
        found = planted & {(r.layer, r.expert) for r in ranked}
        click.echo(f"\nplanted experts in the top {top}: {len(found)} of {len(planted)}")
    click.echo(f"\nwrote {paths['json']}, {paths['profile']} and heatmaps in {out}")
    if run.partial:
        raise click.exceptions.Exit(INTERRUPTED)


@main.group()
def profile() -> None:
    """Show, merge, convert and validate steering profiles."""


@profile.command("show")
@click.argument("path", type=click.Path(path_type=Path))
def profile_show(path: Path) -> None:
    """Print a profile's entries, strength and the model it was made for."""
    from mote_local.cli.shared import load_profile

    p = load_profile(path)
    click.echo(f"{path}: {p.name or 'unnamed'}" + (f" — {p.description}" if p.description else ""))
    fp = p.fingerprint
    click.echo(
        f"made for: {fp.arch}, {fp.n_layer} layers, {fp.n_expert} experts, top-{fp.n_expert_used}, "
        f"router sha256 {fp.router_sha256[:12]}…"
        if fp
        else "made for: any model (no fingerprint)"
    )
    click.echo(f"strength: {p.strength:g}")
    click.echo(f"{len(p.entries)} entries: {p.describe()}")


@profile.command("merge")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="The merged profile (.json/.gguf).")
def profile_merge(paths: Sequence[Path], out: Path) -> None:
    """Compose profiles (biases add, gains multiply) into one."""
    from mote_local.cli.shared import load_profile, profile_target

    merged = load_profile(paths[0])
    for path in paths[1:]:
        merged = merged + load_profile(path)
    merged.save(profile_target(out))
    click.echo(f"wrote {out} ({len(merged.entries)} entries)")


@profile.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
def profile_convert(src: Path, dst: Path) -> None:
    """Convert between JSON and GGUF (by the file suffixes)."""
    from mote_local.cli.shared import load_profile, profile_target

    load_profile(src).save(profile_target(dst))
    click.echo(f"wrote {dst}")


@profile.command("validate")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--force-profile", is_flag=True, help="Accept a profile made for another model (limits still apply).")
def profile_validate(path: Path, model: Path, force_profile: bool) -> None:
    """Check that a profile can steer MODEL."""
    from mote_local.cli.shared import load_profile
    from mote_local.steering.profile import compose

    compose(
        [(str(path), load_profile(path))],
        [],
        read_layout(model).require_moe(),
        force=force_profile,
        way_out="pass --force-profile",
    )
    click.echo(f"{path} fits {model}")


def detector_for(detector_file: Path | None, judge: Path | None):
    from mote_local.evaluation.detectors import Detector, JudgeDetector

    if judge is not None:
        return JudgeDetector(judge)
    return Detector.from_file(detector_file) if detector_file else Detector()


@main.command("eval")
@model_options(chat=True)
@click.option(
    "--prompts",
    "prompts_file",
    required=True,
    type=click.Path(path_type=Path),
    help="Prompts to generate for: a plain file or a TOML/YAML prompt set.",
)
@click.option("--class", "classes", multiple=True, help="Only these classes of the prompt set (repeatable).")
@steering_options
@click.option(
    "--sweep",
    "sweep_sizes",
    default=None,
    metavar="N,N,…",
    help="Instead of one profile, switch off the top N experts of an fTRI ranking (--ftri) for each N, "
    "e.g. 1,2,5,10,20: behaviour rate vs N with random and forced controls at each N.",
)
@click.option(
    "--ftri",
    "ftri_path",
    type=click.Path(path_type=Path),
    default=None,
    help="The fTRI result (ftri.json, or the --out folder of `mote ftri`) whose ranking --sweep follows.",
)
@click.option("--ftri-method", default=None, help="Which of its methods ranks the experts (default: its first).")
@click.option(
    "--sweep-mode",
    type=click.Choice(["drop", "mask"]),
    default="drop",
    show_default=True,
    help="How --sweep switches experts off.",
)
@click.option(
    "--include-super-experts",
    is_flag=True,
    help="Let --sweep switch off experts flagged as super-experts (left out of the ranking otherwise).",
)
@click.option(
    "--detector",
    "detector_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Behaviour phrases, one per line ('re:' lines are regexes); default: refusal phrasings.",
)
@click.option(
    "--judge",
    type=click.Path(path_type=Path),
    default=None,
    help="A GGUF judge model that answers yes/no instead of the phrase detector.",
)
@click.option(
    "--neutral",
    type=click.Path(path_type=Path),
    default=None,
    help="Neutral text for KL and perplexity (default: the packaged one).",
)
@click.option(
    "--n-random", type=click.IntRange(min=0), default=3, show_default=True, help="Random control profiles (seeds)."
)
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--chat/--raw", "chat", default=True, show_default=True)
@click.option(
    "--collapse-kl",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Flag a condition as collapsed when its mean KL on the neutral text exceeds this (nats).",
)
@click.option(
    "--collapse-ppl",
    type=click.FloatRange(min=1),
    default=10.0,
    show_default=True,
    help="... or when its perplexity exceeds this many times the unsteered one.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("mote-eval"),
    show_default=True,
    help="The report's folder; finished generations are kept there as they come (see --resume).",
)
@click.option("--resume", is_flag=True, help="Continue the run kept in --out (cut short by Ctrl-C or a crash).")
@click.option(
    "--parallel",
    "-np",
    "n_parallel",
    type=click.IntRange(1, MAX_SEQUENCES),
    default=None,
    help="Sequences decoded together (default: from the context size and memory, at most 32).",
)
def eval_command(
    model: Path,
    options: ModelOptions,
    prompts_file: Path,
    classes,
    profiles,
    strength,
    scope,
    force_profile,
    sweep_sizes,
    ftri_path,
    ftri_method,
    sweep_mode,
    include_super_experts,
    detector_file,
    judge,
    neutral,
    n_random: int,
    max_tokens: int,
    seed: int,
    chat: bool,
    collapse_kl: float,
    collapse_ppl: float,
    out: Path,
    resume: bool,
    n_parallel: int | None,
    **specs,
) -> None:
    """Measure how a profile moves a behaviour against random and forced controls, and what it costs; or, with
    --sweep, how the behaviour falls as the top N experts of an fTRI ranking are switched off. Every condition
    and prompt decode together, -np sequences at a time; -c (when given) bounds their context cells in all."""
    from mote_local.evaluation.evaluate import evaluate
    from mote_local.evaluation.report import format_table, write_report
    from mote_local.prompts import load_prompt_set

    layout = read_layout(model).require_moe()
    n_ctx = context_for(layout, options)
    steering = bool(profiles) or any(specs.get(k) for k in SPEC_KINDS)
    if sweep_sizes is None and (ftri_path or ftri_method):
        raise click.UsageError("--ftri gives the ranking for --sweep: add --sweep N,N,… (e.g. 1,2,5,10,20)")
    if sweep_sizes is not None:
        if steering:
            raise click.UsageError(
                "--sweep switches off the top N experts of an fTRI ranking: give it --ftri, "
                "not a profile or steering flags"
            )
        if ftri_path is None:
            raise click.UsageError("--sweep needs the fTRI ranking to follow: --ftri DIR (the --out of `mote ftri`)")
        profile = None
    else:
        profile = build_profile(layout, profiles, specs, strength, scope, force_profile)
        if profile is None:
            raise click.UsageError(
                "give a profile (--profile) or steering flags (--off, --drop, …) to evaluate, or --sweep with --ftri"
            )
    prompt_set = load_prompt_set(prompts_file)
    unknown = set(classes) - set(prompt_set.names)
    if unknown:
        raise click.UsageError(
            f"unknown class(es) {', '.join(sorted(unknown))}: {prompts_file} has {', '.join(prompt_set.names)}"
        )
    prompts = [p for name in (classes or prompt_set.names) for p in prompt_set.prompts(name)]
    common = dict(
        neutral_text=neutral,
        detector=detector_for(detector_file, judge),
        n_random=n_random,
        seed=seed,
        max_tokens=max_tokens,
        chat=chat,
        collapse_kl=collapse_kl,
        collapse_perplexity_ratio=collapse_ppl,
        n_parallel=n_parallel,
        n_ctx=n_ctx if options.context.n_ctx is not None else None,
        out_dir=out,
        resume=resume,
        announce=lambda line: click.echo(line, err=True),
    )
    if profile is None:
        _eval_sweep(
            model,
            layout,
            prompts,
            sweep_sizes,
            ftri_path,
            ftri_method,
            sweep_mode,
            include_super_experts,
            common,
            out,
            options,
            n_ctx,
        )
        return
    with open_model(model, options, chat=chat) as m:
        check_prompts_fit(m, prompts, n_ctx, max_tokens, chat)
        warn_super_experts(m, profile, profiles, specs, options.load.n_threads)
        result = evaluate(m, prompts, profile, **common)
    html = write_report(out, result)
    click.echo(format_table(result))
    _eval_ending(result)
    click.echo(f"\nreport: {html}")


def _eval_ending(result, notes_shown: bool = False) -> None:
    """What was resumed (unless the notes, which say it too, were shown), and how to go on after Ctrl-C."""
    resumed = result.settings.get("resumed", {})
    if not notes_shown and (resumed.get("generations") or resumed.get("costs")):
        click.echo(
            f"resumed: {resumed['generations']} of {resumed['pairs']} generations and {resumed['costs']} "
            "capability cost(s) from the earlier run in this folder"
        )
    if result.partial:
        click.echo(
            "interrupted: the report holds what was measured so far (marked partial); --resume continues", err=True
        )


def check_prompts_fit(model, prompts, n_ctx: int, max_tokens: int, chat: bool) -> None:
    """Every prompt with its generation fits the context -c gives, or an error names the first that does not."""
    for p in prompts:
        require_fit(
            len(model.prompt_tokens(p.text, chat=chat)) + max_tokens,
            n_ctx,
            f"the prompt {p.describe()} with its {max_tokens} generated tokens (-n)",
        )


def _eval_sweep(
    model: Path,
    layout: MoeLayout,
    prompts,
    sizes_text: str,
    ftri_path: Path,
    ftri_method: str | None,
    mode: str,
    include_super_experts: bool,
    common: dict,
    out: Path,
    options: ModelOptions,
    n_ctx: int,
) -> None:
    """`mote eval --sweep`: the paper's curve, one table and one plot."""
    from mote_local.evaluation.report import sweep_table, write_sweep_report
    from mote_local.evaluation.super_experts import cached_super_experts
    from mote_local.evaluation.sweep import parse_sweep, sweep
    from mote_local.ftri.outputs import read_ranking

    sizes = parse_sweep(sizes_text)
    flagged = () if include_super_experts else (cached_super_experts(model) or ())
    ranking = read_ranking(ftri_path, layout.moe_layers, method=ftri_method, exclude=flagged)
    with open_model(model, options, chat=common["chat"]) as m:
        check_prompts_fit(m, prompts, n_ctx, common["max_tokens"], common["chat"])
        result = sweep(m, prompts, ranking, sizes, mode=mode, exclude_super_experts=not include_super_experts, **common)
    html = write_sweep_report(out, result)
    click.echo(
        f"sweep on {layout.path.name}: top N experts of the {ranking.method} ranking switched off "
        f"({mode}), {len(prompts)} prompts"
    )
    click.echo(sweep_table(result))
    for note in result.settings["notes"]:
        click.echo(f"note: {note}")
    _eval_ending(result, notes_shown=True)
    click.echo(f"\nreport: {html}")


@main.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("mote-demo"),
    show_default=True,
    callback=output_directory,
    help="Directory for the report.",
)
@click.option("--top", type=click.IntRange(min=1), default=2, show_default=True, help="Experts the demo switches off.")
@click.option(
    "--export",
    "export_dir",
    type=click.Path(path_type=Path),
    default=None,
    callback=output_directory,
    help="Instead of the demo, write its model and prompt set into this directory (planted.gguf, "
    "prompts.toml), to try every command on them.",
)
@click.option(
    "--model",
    "which",
    type=click.Choice(["planted", "trained"]),
    default="planted",
    show_default=True,
    help="planted: the refusal written into two experts; trained: the language experts of a small MoE "
    "trained here on the Debian Reference in five languages (mote_local/data/trained/MODEL_CARD.md).",
)
@threads_option
def demo(out: Path, top: int, export_dir: Path | None, which: str, threads: int | None) -> None:
    """The whole story on a built-in model: fTRI finds the planted experts, switching them off removes
    the behaviour, a random control does not (--model trained: the same on a model trained here on real
    text, whose language experts nobody planted). Nothing is downloaded."""
    from mote_local.synthetic import planted

    if export_dir is not None:
        model_file, prompts_file = planted.export(export_dir)
        click.echo(
            f"wrote {model_file}\n      a tiny {planted.ARCH} model with a refusal planted in two experts"
            f"\nwrote {prompts_file}\n      its prompt set: trigger and neutral classes"
        )
        return
    run_story(planted_story(top) if which == "planted" else trained_story(top), out, threads)


@dataclass
class DemoStory:
    """What one built-in demo runs and says; run_story tells every story the same way."""

    path: Path
    intro: str  # what the model is
    behavior: Sequence[Prompt]  # prompts of the behaviour and baseline classes
    baseline: Sequence[Prompt]
    ftri_what: str  # step 1's line: which prompts, which scope and score
    methods: tuple[str, ...]
    top: int  # experts the profile drops
    table_rows: int  # ranking rows shown
    eval_what: str  # step 3's line
    eval_prompts: list
    eval_options: dict  # evaluate()'s keyword arguments beyond the prompts and profile
    heatmap_title: str
    report_title: str
    profile_name: str = "demo"
    chat: bool = True
    planted: tuple = ()  # the answer, where the story knows it
    closing: str = ""


def planted_story(top: int) -> DemoStory:
    from mote_local.prompts import load_prompt_set, select_classes
    from mote_local.synthetic import planted

    path, truth = planted.planted_model()
    behavior, baseline = select_classes(load_prompt_set(planted.prompts_path()), "trigger", "neutral")
    return DemoStory(
        path=path,
        intro=f"a tiny {truth.arch} model with a refusal planted in experts "
        f"{', '.join(f'{l}:{e}' for l, e in truth.planted)} (the demo does not tell fTRI)",
        behavior=behavior,
        baseline=baseline,
        ftri_what=f"{len(behavior)} trigger vs {len(baseline)} neutral prompts, prompt tokens, class-mean difference "
        "of per-prompt activation maps",
        methods=("mean_diff", "risk_diff"),
        top=top,
        table_rows=max(top, 5),
        eval_what="evaluation on all prompts, greedy: unsteered, profile, random control (3 seeds), forced",
        eval_prompts=list(behavior) + list(baseline),
        eval_options={"n_random": 3, "max_tokens": 12},
        heatmap_title=f"fTRI mean_diff, prompt tokens\n{path.name}",
        report_title="mote demo: a planted refusal",
        planted=tuple(truth.planted),
    )


def trained_story(top: int) -> DemoStory:
    """fTRI and evaluation on the shipped trained model: German vs English prompts of held-out text."""
    from importlib.resources import files

    from mote_local.evaluation.detectors import Detector
    from mote_local.prompts import load_prompt_set, select_classes

    data = Path(str(files("mote_local").joinpath("data", "trained")))
    path = data / "trained-q8_0.gguf"
    behavior, baseline = select_classes(load_prompt_set(data / "prompts.toml"), "de", "en")
    return DemoStory(
        path=path,
        intro="a 4-layer, 32-expert, top-4 Qwen3-MoE trained here on the Debian Reference in five "
        "languages (its model card: data, seed, steps, loss)",
        behavior=behavior,
        baseline=baseline,
        ftri_what=f"{len(behavior)} German vs {len(baseline)} English prompts (the same held-out sections), prompt "
        "tokens, class-mean difference",
        methods=("mean_diff",),
        top=max(top, 4),
        table_rows=8,
        chat=False,
        eval_what="evaluation on 16 German prompts, greedy, 24 tokens: the rate of German continuations (a German "
        "stop-word detector); capability cost on held-out German text",
        eval_prompts=list(behavior)[:16],
        eval_options={
            "detector": Detector.from_file(data / "german.txt"),
            "neutral_text": data / "heldout_de.txt",
            "n_random": 2,
            "max_tokens": 24,
            "chat": False,
        },
        heatmap_title=f"fTRI mean_diff, German vs English\n{path.name}",
        report_title="mote demo: a trained model",
        profile_name="demo-trained",
        closing="What this model shows (the recorded experiment, MODEL_CARD.md): fTRI finds German-selective experts "
        "with tight intervals, but switching them off does not stop German continuations; it raises the cost "
        "on German text far more than a random control of the same size does.",
    )


def run_story(story: DemoStory, out: Path, threads: int | None) -> None:
    """fTRI, a profile of its top experts, the evaluation against the controls, a report."""
    import time

    from mote_local.engine.model import Model
    from mote_local.evaluation.evaluate import evaluate
    from mote_local.evaluation.report import format_table, write_report
    from mote_local.ftri.capture import run_ftri
    from mote_local.ftri.export import profile_from_ranking
    from mote_local.ftri.outputs import ranking_table, write_heatmap

    started = time.perf_counter()
    click.echo(f"model: {story.path} — {story.intro}")
    with Model(story.path, n_threads=threads) as m:
        _, results = run_ftri(m, story.behavior, story.baseline, methods=story.methods, chat=story.chat, top=story.top)
        full = results["mean_diff"].ranked(layers=m.layout.moe_layers)
        ranked = full[: story.top]
        table = ranking_table(results["mean_diff"], full[: story.table_rows], set(story.planted))
        click.echo(f"\n1. fTRI: {story.ftri_what}\n{table}")
        if story.planted:
            rank_of = {(r.layer, r.expert): i for i, r in enumerate(full, 1)}
            click.echo(
                "   planted experts ranked " + ", ".join(f"{l}:{e} #{rank_of[(l, e)]}" for l, e in story.planted)
            )
        profile = profile_from_ranking(ranked, m, name=story.profile_name, metadata={"source": "mote demo"})
        click.echo(
            f"\n2. profile: drop the top {story.top}: " + ", ".join(f"{e.layer}:{e.expert}" for e in profile.entries)
        )
        click.echo(f"\n3. {story.eval_what}")
        result = evaluate(m, story.eval_prompts, profile, **story.eval_options)
        heatmap = out / "heatmap_mean_diff.png"
        out.mkdir(parents=True, exist_ok=True)
        write_heatmap(heatmap, results["mean_diff"], m.layout.moe_layers, ranked, story.heatmap_title)
    click.echo(format_table(result))
    if story.closing:
        click.echo(f"\n{story.closing}")
    html = write_report(out, result, ftri_heatmap=heatmap, ftri_table=table, title=story.report_title)
    click.echo(f"\ndone in {time.perf_counter() - started:.0f} s — report: {html.resolve()}")


def warn_quantization(layout: MoeLayout) -> None:
    """One line where the model's quantization, judged by its tensor types, is measured (or not known) to move
    routing away from the full-precision model's (mote_local.modelfile.quantize.routing_class)."""
    from mote_local.modelfile.quantize import routing_class

    warning = routing_class(layout.tensor_types).warning
    if warning:
        click.echo(warning, err=True)


@main.command()
@model_options(chat=True)
@click.option(
    "--n-predict",
    "-n",
    type=click.IntRange(min=-1),
    default=128,
    show_default=True,
    help="Tokens per reply at most (-1: until the reply ends, bounded by the context).",
)
@sampling_options
@click.option(
    "--chat/--raw",
    "chat",
    default=True,
    show_default=True,
    help="Talk through the chat template (--raw: the conversation as plain text, one message per line).",
)
@steering_options
def chat(
    model: Path,
    options: ModelOptions,
    n_predict: int,
    sampling,
    chat: bool,
    profiles,
    strength,
    scope,
    force_profile,
    **specs,
) -> None:
    """Chat with MODEL and toggle its experts live (/help inside lists the commands)."""
    from mote_local.cli.chat import Chat, history_path, terminal_reader

    if n_predict == 0:
        raise click.UsageError("-n 0 would make every reply empty: give -n N, or -n -1 for replies until they end")
    layout = read_layout(model).require_moe()
    n_ctx = context_for(layout, options)
    profile = build_profile(layout, profiles, specs, strength, scope, force_profile)
    with open_model(model, options, chat=chat) as m, m.session(n_ctx=n_ctx) as s:
        session = Chat(
            m,
            s,
            max_tokens=n_predict,
            sampling=sampling,
            chat=chat,
            n_threads=options.load.n_threads,
            write=lambda text="", end="\n": click.echo(text, nl=end == "\n"),
        )
        if profile is not None:
            session.steer(profile)
        session.loop(terminal_reader(history_path()) if sys.stdin.isatty() else _read_line)


def _read_line(prompt: str) -> str:
    click.echo(prompt, nl=False)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


@main.command("rpc-server")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. llama.cpp's RPC has no authentication: bind another address only on a network you trust.",
)
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=50052, show_default=True)
@threads_option
def rpc_server(host: str, port: int, threads: int | None) -> None:
    """Lend this machine's CPU (and GPUs, in a GPU build) to models loaded elsewhere with --rpc HOST:PORT:
    llama.cpp's rpc-server, built with this package's engine. Serves one client at a time; Ctrl-C stops it."""
    import os
    import signal
    import socket

    from mote_local.engine.rpc import server_command

    command = server_command(host, port, threads or os.cpu_count() or 1)
    try:  # the server's own message for a taken port is a bare "Failed to create server socket"
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise click.ClickException(
            f"cannot listen on {host}:{port} ({err.strerror or err}): choose another --port, or stop what listens there"
        ) from None
    click.echo(f"rpc server on {host}:{port} — load models elsewhere with --rpc {host}:{port}", err=True)
    # a client that leaves while the server answers would kill it with SIGPIPE; ignored, it survives the exec
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    os.execv(command[0], command)  # becomes the server: its signals and exit status are the command's


from mote_local.serve.command import serve_command  # noqa: E402  (`mote serve`: llama-server, launched)

main.add_command(serve_command)

from mote_local.cli.quantize import quantize_command  # noqa: E402  (`mote quantize`)

main.add_command(quantize_command)
