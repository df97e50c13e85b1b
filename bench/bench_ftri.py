#!/usr/bin/env python3
"""fTRI capture on mote-local vs the way researchers do it today (HF transformers + router forward hooks).

One run, same random Qwen3-MoE weights on both sides (built with transformers, converted with the pinned
llama.cpp's convert_hf_to_gguf.py, quantized with llama_model_quantize), same prompts, same token ids:

  prompt scope     transformers 4.x (this interpreter) and 5.x (--tf5-python, a bench-only venv), each CPU experts
                   implementation 5.x offers (eager, grouped_mm, batched_mm), bf16/f32, several batch sizes, a
                   forward hook on every ``mlp.gate``: screened once each (time-budgeted), the families within
                   --keep x of the best go on to the rounds                                        vs
                   mote_local.ftri.capture.capture_activations at Q8_0 / BF16 / Q4_K_M / `mote quantize
                   --recipe capture` as `mote ftri` runs it (batch_size 32, ftri.CAPTURE_MODEL_OPTIONS) and levers
                   beside it (repacking, 1 thread, ggml-cpu's own expert matmuls with MOTE_MOE_GEMM=0, more
                   sequences per decode with a larger ubatch through the Session/Capture API)
  generated scope  transformers ``generate`` (greedy, batched, left padding, same hooks)      vs
                   capture_activations(scope="generated"): batched greedy generation, counted while generating
  rounds           the contenders and mote-local's configurations, shuffled anew in each of --rounds rounds; ratios
                   against the fastest transformers configuration are taken within a round (median, min-max)
  fidelity         per-token top-k sets and fTRI top-N (mean_diff) rankings: llama.cpp f32 vs transformers
                   f32, BF16 / Q8_0 / Q4_K_M vs f32, transformers bf16 vs f32

Every measured configuration runs in a fresh subprocess (its peak RSS is its own, from getrusage), after a
warm-up on the first batch; throughput counts prompt (or generated) tokens over the timed pass, model
loading excluded. Checkpoints and GGUFs are cached under ~/.cache/mote-local/bench-ftri/<spec hash>/
(reused by later runs unless --rebuild; about 9 GB).

    python bench/bench_ftri.py --rebuild --results bench/RESULTS.md   # build + measure (~1 h on 2 loaded cores)
    python bench/bench_ftri.py --lean --screening DIR/screening.json  # rounds only, reusing a screening
    python bench/bench_ftri.py --quick --workdir /tmp/bq              # small model: a smoke test of the pipeline

Needs torch and transformers (bench-only, not dependencies of mote-local; the CPU wheel of torch is enough).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import hf_qwen3moe as hfq  # noqa: E402  (no torch at import time)

QTYPES = ("f32", "bf16", "q8_0", "q4_k_m")
SECTION = "## fTRI capture vs transformers"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------------


def make_prompts(n_per_class: int, seed: int = 7) -> tuple[list[str], list[str]]:
    """Behaviour prompts lean on a topic vocabulary, baseline prompts use the general one; 9..58 words
    (10..59 tokens: the words are single tokens of the BPE, plus the final punctuation; no BOS is added)."""
    from mote_local.synthetic import tiny

    words = list(tiny.WORDS)
    rng = random.Random(seed)
    topic = rng.sample(words, 40)
    general = [w for w in words if w not in set(topic)]

    def sentence(behaviour: bool) -> str:
        n = rng.randint(9, 58)
        out = [rng.choice(topic) if behaviour and rng.random() < 0.4 else rng.choice(general) for _ in range(n)]
        s = " ".join(out)
        return s[0].upper() + s[1:] + rng.choice([".", "?", "!"])

    return [sentence(True) for _ in range(n_per_class)], [sentence(False) for _ in range(n_per_class)]


# ------------------------------------------------------------------------------------------------------
# Workers (each one runs in its own process)
# ------------------------------------------------------------------------------------------------------


def worker_build(cfg: dict) -> dict:
    from mote_local.synthetic import tiny

    work = Path(cfg["workdir"])
    spec = hfq.HfSpec(**cfg["spec"])
    t = {}
    t0 = time.perf_counter()
    info = hfq.build_checkpoints(spec, list(tiny.WORDS), work / "hf-f32", work / "hf-bf16")
    t["hf_build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hfq.convert_to_gguf(work / "hf-f32", work / "model-f32.gguf")
    t["convert_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hfq.convert_to_gguf(work / "hf-f32", work / "model-bf16.gguf", "bf16")  # routers stay F32 (the converter's rule)
    t["convert_bf16_s"] = time.perf_counter() - t0
    for q in ("q8_0", "q4_k_m"):
        t0 = time.perf_counter()
        hfq.quantize(work / "model-f32.gguf", work / f"model-{q}.gguf", q)
        t[f"quantize_{q}_s"] = time.perf_counter() - t0
    return {**info, **t}


def worker_tokenize(cfg: dict) -> dict:
    """Token ids as capture_activations(chat=False) makes them (in a worker, so that the orchestrating process
    stays small: a child's peak RSS starts from its parent's RSS at fork time)."""
    from mote_local.engine.model import Model

    with Model(cfg["gguf"], vocab_only=True) as m:
        return {"ids": [m.tokenize(t, add_bos=True) for t in cfg["texts"]]}


def _load_ids(cfg: dict) -> tuple[list[list[int]], np.ndarray]:
    data = json.loads(Path(cfg["prompts"]).read_text())
    return data["ids"], np.array(data["is_behavior"], dtype=bool)


# --- transformers -----------------------------------------------------------------------------------


def _hf_model(cfg: dict):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(cfg["threads"])
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[cfg["dtype"]]
    kw = {"experts_implementation": cfg["experts"]} if cfg.get("experts") else {}  # transformers 5.x only
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg["hf_dir"], dtype=dtype, **kw).eval()
    return model, time.perf_counter() - t0


def _hf_info(model) -> dict:
    import torch
    import transformers

    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        # 4.x has no switch: its sparse block loops over the experts a batch hits
        "experts_implementation": getattr(model.config, "_experts_implementation", None) or "eager (4.x loop)",
        "attn_implementation": model.config._attn_implementation,
    }


def worker_hf_prompt(cfg: dict) -> dict:
    """Batched forward (right padding) with a hook on every router; counts per prompt over real tokens."""
    import torch

    ids, _ = _load_ids(cfg)
    model, load_s = _hf_model(cfg)
    hooks = hfq.RouterHooks(model)
    n_layer, n_expert = model.config.num_hidden_layers, model.config.num_experts
    bs = cfg["batch"]

    def run(batch: list[list[int]]):
        longest = max(len(s) for s in batch)
        inp = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, s in enumerate(batch):
            inp[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        hooks.clear()
        with torch.inference_mode():
            model(input_ids=inp, attention_mask=mask, use_cache=False)
        real = mask.flatten().bool()
        rows = torch.arange(len(batch)).repeat_interleave(longest)[real]
        per_layer = [hooks.calls[0][l][real] for l in range(n_layer)]  # [tokens, k] each
        counts = torch.zeros((len(batch), n_layer, n_expert), dtype=torch.long)
        for l, sel in enumerate(per_layer):
            flat = (rows[:, None] * n_expert + sel).flatten()
            counts[:, l, :] = torch.bincount(flat, minlength=len(batch) * n_expert).view(len(batch), n_expert)
        return counts, torch.stack(per_layer, dim=1)  # [tokens, layer, k]

    run(ids[: min(bs, 16 if "budget_s" in cfg else 32)])  # warm-up
    t0 = time.perf_counter()
    counts, trace = [], []
    n_tok = 0
    for start in range(0, len(ids), bs):
        c, tr = run(ids[start : start + bs])
        counts.append(c)
        trace.append(tr)
        n_tok += sum(len(s) for s in ids[start : start + bs])
        if time.perf_counter() - t0 > cfg.get("budget_s", float("inf")):
            break  # screening: throughput over the whole batches that fit the time budget
    wall = time.perf_counter() - t0
    np.savez_compressed(
        cfg["out_npz"], counts=torch.cat(counts).numpy(), trace=torch.cat(trace).numpy().astype(np.int16)
    )
    hooks.remove()
    return {
        "tok_s": n_tok / wall,
        "wall_s": wall,
        "tokens": n_tok,
        "load_s": load_s,
        "rss_mb": peak_rss_mb(),
        **_hf_info(model),
    }


def worker_hf_generate(cfg: dict) -> dict:
    """Batched greedy generate (left padding) with the router hooks; counts over the generated tokens."""
    import torch

    ids, _ = _load_ids(cfg)
    ids = ids[: cfg["n_prompts"]]
    model, load_s = _hf_model(cfg)
    hooks = hfq.RouterHooks(model)
    n_layer, n_expert = model.config.num_hidden_layers, model.config.num_experts
    bs, new = cfg["batch"], cfg["new_tokens"]

    def run(batch: list[list[int]]):
        longest = max(len(s) for s in batch)
        inp = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, s in enumerate(batch):
            inp[i, longest - len(s) :] = torch.tensor(s)
            mask[i, longest - len(s) :] = 1
        hooks.clear()
        with torch.inference_mode():
            out = model.generate(
                input_ids=inp,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        # forward 0 is the prompt; forward j >= 1 routes generated token j-1 (the last one never enters the model)
        counts = torch.zeros((len(batch), n_layer, n_expert), dtype=torch.long)
        rows = torch.arange(len(batch))
        for call in hooks.calls[1:]:
            for l in range(n_layer):
                flat = (rows[:, None] * n_expert + call[l]).flatten()
                counts[:, l, :] += torch.bincount(flat, minlength=len(batch) * n_expert).view(len(batch), n_expert)
        return counts, out[:, longest:]

    run(ids[: min(bs, 4)])  # warm-up
    t0 = time.perf_counter()
    counts, gens = [], []
    for start in range(0, len(ids), bs):
        c, g = run(ids[start : start + bs])
        counts.append(c)
        gens += g.tolist()
        if time.perf_counter() - t0 > cfg.get("budget_s", float("inf")):
            break
    wall = time.perf_counter() - t0
    n_gen = sum(len(g) for g in gens)
    np.savez_compressed(cfg["out_npz"], counts=torch.cat(counts).numpy())
    hooks.remove()
    return {
        "tok_s": n_gen / wall,
        "wall_s": wall,
        "tokens": n_gen,
        "load_s": load_s,
        "rss_mb": peak_rss_mb(),
        "gens": gens,
        **_hf_info(model),
    }


# --- mote-local --------------------------------------------------------------------------------------


def _mote_model(cfg: dict):
    from mote_local.engine.model import Model

    t0 = time.perf_counter()
    model = Model(cfg["gguf"], **cfg.get("model_params", {}))
    return model, time.perf_counter() - t0


def _prompt_objs(cfg: dict):
    from mote_local.prompts import Prompt

    data = json.loads(Path(cfg["prompts"]).read_text())
    beh = [Prompt(t, "behavior") for t in data["behavior"]]
    base = [Prompt(t, "baseline") for t in data["baseline"]]
    return beh, base, data


def worker_mote_ftri(cfg: dict) -> dict:
    """The product path: mote_local.ftri.capture.capture_activations, as `mote ftri` runs it."""
    from mote_local.ftri.capture import capture_activations

    beh, base, data = _prompt_objs(cfg)
    n = cfg.get("n_prompts")
    if n:
        beh, base = beh[: n // 2], base[: n // 2]
    model, load_s = _mote_model(cfg)
    scope, bs = cfg["scope"], cfg["batch_size"]
    kw = dict(
        scope=scope,
        chat=False,
        batch_size=bs,
        max_new_tokens=cfg.get("new_tokens", 32),
        show_progress=False,
        n_threads=cfg.get("n_threads"),
    )
    capture_activations(model, beh[: max(1, bs // 2)], base[: max(1, bs // 2)], **kw)  # warm-up
    t0 = time.perf_counter()
    run = capture_activations(model, beh, base, **kw)
    wall = time.perf_counter() - t0
    layer0 = model.layout.moe_layers[0]
    n_tok = int(run.activations.tokens[:, layer0].sum())
    np.savez_compressed(cfg["out_npz"], counts=run.activations.counts)
    res = {"tok_s": n_tok / wall, "wall_s": wall, "tokens": n_tok, "load_s": load_s, "rss_mb": peak_rss_mb()}
    if scope == "prompt":
        ids = [model.tokenize(p.text, add_bos=True) for p in run.prompts]
        res["ids_match"] = ids == data["ids"][: len(ids)]
    model.close()
    return res


def _capture_loop(
    model,
    seqs: list[list[int]],
    *,
    batch_size: int,
    n_ubatch: int | None,
    n_batch: int | None,
    kv_unified: bool,
    flash_attn: str,
    trace: bool,
    ctx_params: dict | None = None,
):
    """capture_activations' loop (one sequence per prompt, bound to its own label) with the context
    parameters exposed. Returns counts [P, L, E] and, with trace, ids [tokens, L, k] in prompt order."""
    layout = model.layout
    longest = max(len(s) for s in seqs)
    n_ctx = batch_size * longest + 16
    nb = min(n_ctx, n_batch or 2048)
    with (
        model.session(
            n_ctx=n_ctx,
            n_seq_max=batch_size,
            n_batch=nb,
            n_ubatch=min(nb, n_ubatch or 512),
            flash_attn=flash_attn,
            kv_unified=kv_unified,
            **(ctx_params or {}),
        ) as s,
        s.capture(label=None, trace=trace) as cap,
    ):
        for start in range(0, len(seqs), batch_size):
            batch = range(start, min(start + batch_size, len(seqs)))
            cap.unbind_all()
            for seq, idx in enumerate(batch):
                cap.bind(seq, idx)
            s.route([seqs[i] for i in batch])
        counts = np.zeros((len(seqs), layout.n_layer, layout.n_expert), dtype=np.int64)
        for label in cap.labels:
            counts[label] = cap.stats(label).counts
        ids = None
        if trace:
            tr = cap.trace()
            offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
            ids = np.full((offsets[-1], layout.n_layer, layout.n_expert_used), -1, dtype=np.int16)
            ids[offsets[tr.label] + tr.pos, tr.layer] = tr.ids
    return counts, ids


def worker_mote_session(cfg: dict) -> dict:
    """One prototype configuration of the capture loop (context parameters the product does not expose)."""
    seqs, _ = _load_ids(cfg)
    seqs = seqs[: cfg.get("n_prompts") or len(seqs)]
    model, load_s = _mote_model(cfg)
    kw = dict(
        batch_size=cfg["batch_size"],
        n_ubatch=cfg.get("n_ubatch"),
        n_batch=cfg.get("n_batch"),
        kv_unified=cfg.get("kv_unified", False),
        flash_attn=cfg.get("flash_attn", "auto"),
        trace=cfg.get("trace", False),
        ctx_params=cfg.get("ctx_params"),
    )
    _capture_loop(model, seqs[: cfg["batch_size"]], **kw)  # warm-up
    t0 = time.perf_counter()
    counts, ids = _capture_loop(model, seqs, **kw)
    wall = time.perf_counter() - t0
    n_tok = sum(len(s) for s in seqs)
    arrays = {"counts": counts} if ids is None else {"counts": counts, "trace": ids}
    np.savez_compressed(cfg["out_npz"], **arrays)
    model.close()
    return {"tok_s": n_tok / wall, "wall_s": wall, "tokens": n_tok, "load_s": load_s, "rss_mb": peak_rss_mb()}


WORKERS = {name[len("worker_") :]: fn for name, fn in globals().items() if name.startswith("worker_")}


# ------------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, workdir: Path, log: Path, verbose: bool):
        self.workdir, self.log, self.verbose = workdir, log, verbose
        self.n = 0

    def __call__(self, kind: str, python: str | None = None, **cfg) -> dict:
        """Runs one worker in a fresh process (``python``: another interpreter, e.g. a venv with transformers 5)."""
        self.n += 1
        out_json = self.workdir / f"w{self.n:03d}-{kind}.json"
        cfg = {"kind": kind, "out_json": str(out_json), **cfg}
        t0 = time.perf_counter()
        load0 = os.getloadavg()[0]
        with open(self.log, "a") as logf:
            logf.write(f"\n===== {kind} {json.dumps(cfg)}\n")
            logf.flush()
            r = subprocess.run(
                [python or sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                cwd=ROOT,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=os.environ | cfg.get("env", {}),  # e.g. MOTE_MOE_GEMM=0: read once, at the worker's start
            )
        if r.returncode != 0:
            raise RuntimeError(f"worker {kind} failed (exit {r.returncode}); see {self.log}")
        res = json.loads(out_json.read_text())
        res["elapsed_s"] = time.perf_counter() - t0
        res["load_avg"] = (load0, os.getloadavg()[0])  # 1-min load average before and after
        if self.verbose:
            short = {
                k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items() if k not in ("gens", "ids")
            }
            print(f"  [{time.strftime('%H:%M:%S')}] {kind} {_describe(cfg)}: {short}", flush=True)
        return res


def _describe(cfg: dict) -> str:
    keys = (
        "dtype",
        "experts",
        "gguf",
        "batch",
        "batch_size",
        "n_ubatch",
        "n_threads",
        "kv_unified",
        "flash_attn",
        "scope",
        "trace",
        "model_params",
        "n_prompts",
        "budget_s",
    )
    parts = []
    for k in keys:
        if k in cfg:
            v = Path(cfg[k]).stem if k == "gguf" else cfg[k]
            parts.append(f"{k}={v}")
    return " ".join(parts)


def top_sets_agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """a, b: [tokens, layers, k] expert ids. Exact set equality per (token, layer), mean overlap, and tokens
    whose sets agree in every layer."""
    sa, sb = np.sort(a, axis=-1), np.sort(b, axis=-1)
    same = (sa == sb).all(-1)
    k = a.shape[-1]
    overlap = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1) / k
    return {
        "set_identical": float(same.mean()),
        "mean_overlap": float(overlap.mean()),
        "token_all_layers": float(same.all(-1).mean()),
        "n_sets": int(same.size),
    }


def ftri_compare(ca: np.ndarray, cb: np.ndarray, is_behavior: np.ndarray, top: int, k: int) -> dict:
    """fTRI (mean_diff, positive sign, as `mote ftri` ranks) on two count sets of the same prompts."""
    from mote_local.ftri.stats import Activations, analyse

    results = []
    for c in (ca, cb):
        # every counted token selects k distinct experts per layer; mean_diff reads counts and tokens only
        act = Activations(counts=c, tokens=c.sum(-1) // k, weight_sums=c.astype(np.float64), is_behavior=is_behavior)
        results.append(analyse(act, "mean_diff", n_boot=20, top_n=top, sign="positive"))
    sa = {(x.layer, x.expert) for x in results[0].ranked(top)}
    sb = {(x.layer, x.expert) for x in results[1].ranked(top)}
    return {
        "top_overlap": len(sa & sb),
        "score_corr": float(np.corrcoef(results[0].scores.ravel(), results[1].scores.ravel())[0, 1]),
        "count_corr": float(np.corrcoef(ca.ravel(), cb.ravel())[0, 1]),
        "counts_identical": float((ca == cb).all(axis=(1, 2)).mean()),
    }  # prompts with identical count maps


def capture_options() -> dict:
    from mote_local.ftri.capture import CAPTURE_MODEL_OPTIONS

    return dict(CAPTURE_MODEL_OPTIONS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where checkpoints and GGUFs go (default: a cache folder keyed by the model spec; "
        "an existing build there is reused unless --rebuild)",
    )
    ap.add_argument("--rebuild", action="store_true", help="build the checkpoints and GGUFs even if cached")
    ap.add_argument("--prompts", type=int, default=128, help="prompts in all (half behaviour, half baseline)")
    ap.add_argument(
        "--trace-prompts", type=int, default=64, help="prompts whose per-token top-k sets are compared (the first ones)"
    )
    ap.add_argument("--gen-prompts", type=int, default=32, help="prompts for the generated scope")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--hf-batches", type=int, nargs="+", default=[16, 64, 128], help="transformers batch sizes screened"
    )
    ap.add_argument("--hf-gen-batch", type=int, default=16)
    ap.add_argument(
        "--tf5-python",
        default=str(Path.home() / ".cache" / "mote-local" / "venvs" / "tf5" / "bin" / "python"),
        help="an interpreter with transformers 5.x and torch (bench-only venv); skipped when absent",
    )
    ap.add_argument(
        "--screen-s",
        type=float,
        default=20.0,
        help="time budget of each transformers configuration's screening run (whole batches)",
    )
    ap.add_argument(
        "--keep",
        type=float,
        default=3.0,
        help="families screened within this factor of the best go on to the interleaved rounds",
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians and min-max over them)")
    ap.add_argument(
        "--screening",
        type=Path,
        default=None,
        help="reuse the transformers screening of an earlier run (the screening.json it wrote)",
    )
    ap.add_argument(
        "--lean",
        action="store_true",
        help="rounds with the product configurations and the ubatch lever only (no repacking, 1-thread "
        "or Q4_K_M generated-scope runs)",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="small model and prompt set: checks the pipeline")
    ap.add_argument("--results", type=Path, default=None, help="append (or replace) the section in this markdown file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker is not None:
        cfg = json.loads(args.worker)
        res = WORKERS[cfg["kind"]](cfg)
        Path(cfg["out_json"]).write_text(json.dumps(res))
        return

    t_start = time.perf_counter()
    argv = " ".join(sys.argv[1:])
    spec = hfq.HfSpec()
    if args.quick:
        spec = hfq.HfSpec(
            hidden=256,
            n_layer=4,
            n_expert=16,
            n_expert_used=4,
            moe_ff=128,
            n_head=4,
            n_head_kv=2,
            head_dim=64,
            vocab=2048,
        )
        args.prompts, args.trace_prompts = min(args.prompts, 32), min(args.trace_prompts, 16)
        args.gen_prompts, args.new_tokens = min(args.gen_prompts, 8), min(args.new_tokens, 8)
        args.hf_batches, args.rounds, args.screen_s = [8, 32], min(args.rounds, 2), min(args.screen_s, 2.0)
    workdir = args.workdir or Path.home() / ".cache" / "mote-local" / "bench-ftri" / spec.key()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "bench.log"
    log.write_text("")
    run = Runner(workdir, log, verbose=True)
    print(f"workdir {workdir} (worker log: {log}); load average {os.getloadavg()}", flush=True)

    # 1. model: HF checkpoints -> GGUF f32 -> Q8_0, Q4_K_M
    ggufs = {q: workdir / f"model-{q}.gguf" for q in QTYPES}
    build_info_path = workdir / "build.json"
    if args.rebuild or not (build_info_path.exists() and all(p.exists() for p in ggufs.values())):
        build = run("build", workdir=str(workdir), spec=asdict(spec))
        build_info_path.write_text(json.dumps(build))
        build["reused"] = False
    else:
        build = json.loads(build_info_path.read_text())
        build["reused"] = True
    # `mote quantize --recipe capture`: routed experts Q6_K, output Q8_0, the rest F16
    ggufs_capture = workdir / "model-capture.gguf"
    if args.rebuild or not ggufs_capture.exists():
        from mote_local.modelfile.quantize import quantize

        quantize(ggufs["f32"], ggufs_capture, "capture", force=True)
    sizes = {q: p.stat().st_size / 2**20 for q, p in ggufs.items()}

    # 2. prompts, tokenized by llama.cpp exactly as capture_activations(chat=False) does; HF gets the same ids
    beh, base = make_prompts(args.prompts // 2)
    texts = [t for pair in zip(beh, base) for t in pair]  # capture_activations' order: interleaved
    ids = run("tokenize", gguf=str(ggufs["q4_k_m"]), texts=texts)["ids"]
    is_behavior = np.array([i % 2 == 0 for i in range(len(texts))])
    prompts_file = workdir / "prompts.json"
    prompts_file.write_text(
        json.dumps({"behavior": beh, "baseline": base, "ids": ids, "is_behavior": is_behavior.tolist()})
    )
    lens = [len(s) for s in ids]
    print(
        f"{len(ids)} prompts, {sum(lens)} tokens (length {min(lens)}..{max(lens)}, mean {np.mean(lens):.1f})",
        flush=True,
    )
    common = dict(prompts=str(prompts_file), threads=args.threads)
    npz = lambda name: str(workdir / f"{name}.npz")  # noqa: E731
    q4 = str(ggufs["q4_k_m"])
    R: dict[str, dict] = {}

    # 3. transformers screening: every configuration once, time-budgeted (whole batches until the budget is spent)
    grid = hf_grid(args, workdir)
    if args.screening:  # an earlier run's screening (its screening.json), so that rounds can be rerun alone
        saved = json.loads(args.screening.read_text())
        S, SG = saved["S"], saved["SG"]
    else:
        S: dict[str, dict] = {}
        for c in grid:
            S[c["name"]] = {
                **run("hf_prompt", **c["run"], budget_s=args.screen_s, out_npz=npz("screen"), **common),
                "cfg": c,
            }
        gen_grid = [c for c in grid if c["run"]["batch"] == grid[0]["run"]["batch"]]  # generate: one batch size
        SG: dict[str, dict] = {}
        for c in gen_grid:
            SG[c["name"]] = {
                **run(
                    "hf_generate",
                    **{**c["run"], "batch": args.hf_gen_batch},
                    budget_s=0,
                    n_prompts=args.gen_prompts,
                    new_tokens=args.new_tokens,
                    out_npz=npz("screen"),
                    **common,
                ),
                "cfg": c,
            }
        (workdir / "screening.json").write_text(json.dumps({"S": S, "SG": SG}, default=str))
    contenders = pick_contenders(S, args.keep)
    gen_best = max(SG, key=lambda k: SG[k]["tok_s"])
    print(f"contenders: {contenders}; generate: {gen_best}", flush=True)

    # 4. interleaved rounds: the transformers contenders and mote-local's configurations, shuffled in every round
    cap = capture_options()
    mote = {
        "ftri_q8_0": dict(kind="mote_ftri", gguf=str(ggufs["q8_0"]), scope="prompt", batch_size=32, model_params=cap),
        "ftri_bf16": dict(kind="mote_ftri", gguf=str(ggufs["bf16"]), scope="prompt", batch_size=32, model_params=cap),
        "ftri_q4_k_m": dict(kind="mote_ftri", gguf=q4, scope="prompt", batch_size=32, model_params=cap),
        "ftri_capture": dict(
            kind="mote_ftri", gguf=str(ggufs_capture), scope="prompt", batch_size=32, model_params=cap
        ),
        # levers, each against the product configuration of its type in the same round
        "ftri_q4_k_m_repack": dict(kind="mote_ftri", gguf=q4, scope="prompt", batch_size=32, model_params={}),
        "ftri_q8_0_t1": dict(
            kind="mote_ftri", gguf=str(ggufs["q8_0"]), scope="prompt", batch_size=32, model_params=cap, n_threads=1
        ),
        # ggml-cpu's own expert matmuls instead of the grouped one (native/mote-moe-matmul.cpp)
        **{
            f"ftri_{q}_stock_kernel": dict(
                kind="mote_ftri",
                gguf=str(ggufs[q]),
                scope="prompt",
                batch_size=32,
                model_params=cap,
                env={"MOTE_MOE_GEMM": "0"},
            )
            for q in ("q8_0", "bf16")
        },
        "proto_q8_0_ub2048": dict(
            kind="mote_session",
            gguf=str(ggufs["q8_0"]),
            batch_size=64,
            n_ubatch=2048,
            n_batch=2048,
            kv_unified=True,
            model_params=cap,
        ),
    }
    if args.lean:  # the product configurations and one lever: rounds that fit a shorter slot
        mote = {
            key: c
            for key, c in mote.items()
            if key
            in (
                "ftri_q8_0",
                "ftri_bf16",
                "ftri_q4_k_m",
                "ftri_capture",
                "ftri_q8_0_stock_kernel",
                "ftri_bf16_stock_kernel",
            )
        }
    gen = dict(n_prompts=args.gen_prompts, new_tokens=args.new_tokens)
    gen_cfgs = {
        "gen_hf": dict(kind="hf_generate", **{**SG[gen_best]["cfg"]["run"], "batch": args.hf_gen_batch}, **gen),
        "gen_q8_0": dict(
            kind="mote_ftri",
            gguf=str(ggufs["q8_0"]),
            scope="generated",
            batch_size=args.gen_prompts,
            model_params=cap,
            **gen,
        ),
        "gen_q4_k_m": dict(
            kind="mote_ftri", gguf=q4, scope="generated", batch_size=args.gen_prompts, model_params=cap, **gen
        ),
    }
    if args.lean:
        del gen_cfgs["gen_q4_k_m"]
    plan = {**{f"hf:{n}": dict(kind="hf_prompt", **S[n]["cfg"]["run"]) for n in contenders}, **mote, **gen_cfgs}
    rounds = interleaved_rounds(run, plan, args.rounds, lambda i, key: npz(f"r{i}_{key.replace(':', '_')}"), common)
    # f32 once (its counts feed the fidelity comparison; its speed is not a target)
    R: dict[str, dict] = {
        "ftri_f32": run(
            "mote_ftri",
            gguf=str(ggufs["f32"]),
            scope="prompt",
            batch_size=32,
            model_params=cap,
            out_npz=npz("ftri_f32"),
            **common,
        )
    }

    # 5. fidelity traces: transformers at the fastest configuration of each dtype; llama.cpp with flash attention off
    for d in ("bf16", "f32"):
        name = max((n for n in S if S[n]["cfg"]["run"]["dtype"] == d), key=lambda n: S[n]["tok_s"])
        R[f"hf_{d}"] = {**run("hf_prompt", **S[name]["cfg"]["run"], out_npz=npz(f"hf_{d}"), **common), "name": name}
    for q in QTYPES:
        R[f"trace_{q}"] = run(
            "mote_session",
            gguf=str(ggufs[q]),
            batch_size=32,
            n_ubatch=512,
            kv_unified=True,
            flash_attn="off",
            trace=True,
            n_prompts=args.trace_prompts,
            out_npz=npz(f"trace_{q}"),
            **common,
        )
    R["trace_f32_kvf32"] = run(
        "mote_session",
        gguf=str(ggufs["f32"]),
        batch_size=32,
        n_ubatch=512,
        kv_unified=True,
        flash_attn="off",
        trace=True,
        n_prompts=args.trace_prompts,
        ctx_params={"type_k": 0, "type_v": 0},
        out_npz=npz("trace_f32_kvf32"),
        **common,
    )

    total_s = time.perf_counter() - t_start
    report = analyse_results(
        args, argv, spec, build, sizes, ids, is_behavior, S, SG, contenders, gen_best, rounds, R, workdir, total_s
    )
    print("\n" + report)
    if args.results:
        append_section(args.results, report)
        print(f"\nwritten to {args.results}")


def interleaved_rounds(
    run: Runner, plan: dict[str, dict], n_rounds: int, out_npz, common: dict
) -> list[dict[str, dict]]:
    """Every configuration of ``plan`` (worker kind and options) once per round, in an order shuffled anew in each
    round (seeded), so that drift of the machine hits every configuration alike; ``out_npz(round, key)``."""
    rounds: list[dict[str, dict]] = []
    rng = random.Random(0)
    for i in range(n_rounds):
        order = list(plan)
        rng.shuffle(order)
        rr = {}
        for key in order:
            c = dict(plan[key])
            rr[key] = run(c.pop("kind"), out_npz=out_npz(i, key), **c, **common)
        rounds.append(rr)
    return rounds


def hf_grid(args, workdir: Path) -> list[dict]:
    """Every transformers configuration measured: 4.x (this interpreter) and 5.x (--tf5-python), each experts
    implementation 5.x offers on a CPU, bf16 and f32, every batch size."""
    grid = []
    versions = [("4.57", sys.executable, [None])]
    if args.tf5_python and Path(args.tf5_python).exists():
        versions.append(("5.x", args.tf5_python, ["eager", "grouped_mm", "batched_mm"]))
    for ver, python, experts in versions:
        for ex in experts:
            for dtype in ("bf16", "f32"):
                # batched_mm gathers a copy of its expert's weights for every (token, expert) pair: 3 MiB per pair
                # in bf16 here, 27 GiB for a batch of 16 prompts; it runs one prompt per forward
                for bs in [1] if ex == "batched_mm" else args.hf_batches:
                    grid.append(
                        {
                            "name": f"{ver} {ex or 'eager loop'} {dtype} b{bs}",
                            "version": ver,
                            "run": dict(
                                python=python, hf_dir=str(workdir / f"hf-{dtype}"), dtype=dtype, batch=bs, experts=ex
                            ),
                        }
                    )
    return grid


def pick_contenders(S: dict[str, dict], keep: float) -> list[str]:
    """The best-screened configuration of each (version, experts implementation) family whose screened throughput is
    within a factor ``keep`` of the best: the others cannot be the fastest through the noise of these machines."""
    best = max(r["tok_s"] for r in S.values())
    fam: dict[tuple, str] = {}
    for name, r in S.items():
        key = (r["cfg"]["version"], r["cfg"]["run"]["experts"])
        if key not in fam or r["tok_s"] > S[fam[key]]["tok_s"]:
            fam[key] = name
    return [n for n in fam.values() if S[n]["tok_s"] * keep >= best]


def _spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return fmt.format(float(np.median(values))) + " (" + fmt.format(min(values)) + "–" + fmt.format(max(values)) + ")"


def analyse_results(
    args,
    argv,
    spec,
    build,
    sizes,
    ids,
    is_behavior,
    S,
    SG,
    contenders,
    gen_best,
    rounds,
    R,
    workdir: Path,
    total_s: float,
) -> str:
    load = lambda name, key="counts": np.load(workdir / f"{name}.npz")[key]  # noqa: E731
    k = spec.n_expert_used
    verdict = lambda ok: "**met**" if ok else "**missed**"  # noqa: E731
    tps = {key: [rr[key]["tok_s"] for rr in rounds] for key in rounds[0]}
    rss = {key: float(np.median([rr[key]["rss_mb"] for rr in rounds])) for key in rounds[0]}
    hf_keys = [f"hf:{n}" for n in contenders]
    best = max(hf_keys, key=lambda key: np.median(tps[key]))
    ratio = {key: [rr[key]["tok_s"] / rr[best]["tok_s"] for rr in rounds] for key in rounds[0]}
    vs = lambda a, b: [rr[a]["tok_s"] / rr[b]["tok_s"] for rr in rounds]  # noqa: E731
    loads = [
        l
        for rr in [*rounds, S, SG, R]
        for r in rr.values()
        if isinstance(r, dict) and "load_avg" in r
        for l in r["load_avg"]
    ]
    lines = []
    w = lines.append
    w(SECTION)
    w("")
    w(
        f"Command: `nice -n 5 python bench/bench_ftri.py{(' ' + argv) if argv else ''}` from the repository root "
        f"({time.strftime('%Y-%m-%d')}); whole run {total_s / 60:.1f} min"
        + (" (model build reused from the cache)." if build.get("reused") else " including the model build.")
    )
    w(
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores, {_mem_gib():.0f} GiB RAM, shared: 1-min load average "
        f"{min(loads):.1f}–{max(loads):.1f} around the workers (median {np.median(loads):.1f}; 2.0 = both cores busy, "
        f"which a worker alone does, more means other jobs ran beside it), so absolute figures are low and noisy; "
        f"compare within a round. threads={args.threads} unless said. Python {platform.python_version()}, torch "
        f"{_version('torch')}, transformers {_version('transformers')} (this interpreter) and "
        f"{_tf5_version(args)} (`--tf5-python`), llama.cpp of llama-cpp-python 0.3.36 (mote_local_engine)."
    )
    w("")
    w(
        f"Model: random `Qwen3MoeForCausalLM`, hidden {spec.hidden}, {spec.n_layer} layers, {spec.n_expert} experts, "
        f"top-{k}, expert FFN {spec.moe_ff}, {spec.n_head}/{spec.n_head_kv} heads × {spec.head_dim}, vocab "
        f"{build['vocab']} ({build['vocab_used']} ids used by a byte-level BPE trained on a word corpus), "
        f"{build['n_params'] / 1e6:.0f} M params; router logits std ≈ {spec.router_logit_std} (clear margins). "
        f"`save_pretrained` (f32 and bf16) → pinned `convert_hf_to_gguf.py` (f32; BF16 with `--outtype bf16`, routers "
        f"stay F32) → `llama_model_quantize` (Q8_0, Q4_K_M); GGUF {sizes['f32']:.0f} / {sizes['bf16']:.0f} / "
        f"{sizes['q8_0']:.0f} / {sizes['q4_k_m']:.0f} MiB (f32 / BF16 / Q8_0 / Q4_K_M)."
    )
    lens = [len(s) for s in ids]
    w(
        f"Prompts: {len(ids)} ({int(is_behavior.sum())} behaviour, {int((~is_behavior).sum())} baseline), "
        f"{sum(lens)} tokens, {min(lens)}–{max(lens)} per prompt (mean {np.mean(lens):.1f}), tokenized once by "
        f"llama.cpp and the same ids fed to transformers (`chat=False`)."
    )
    w("")
    w(
        "Method. Every configuration runs in its own process (peak RSS from getrusage is its own) after a warm-up "
        "batch; throughput counts the timed pass only, model load excluded. (1) Screening: every transformers "
        "configuration once, with a forward hook on every `mlp.gate`, timed over whole batches until "
        f"{args.screen_s:g} s "
        f"have passed. (2) The best-screened configuration of each family (version × experts implementation) within "
        f"{args.keep:g}× of the best screened one goes on to (3) {args.rounds} rounds in which the transformers "
        f"contenders and mote-local's configurations each run once over all prompts, in a new random order every "
        f"round. Ratios are taken within a round against the fastest transformers configuration (highest median), then "
        f"the median and min–max over rounds are reported."
    )
    w("")
    w("### transformers screening (one time-budgeted run each)")
    w("")
    w("| configuration | prompt tok/s | peak RSS MiB |")
    w("|---|---:|---:|")
    for name, r in sorted(S.items(), key=lambda kv: -kv[1]["tok_s"]):
        w(f"| {name}{' → rounds' if name in contenders else ''} | {r['tok_s']:.0f} | {r['rss_mb']:.0f} |")
    w("")
    w(
        f"`generate` ({args.gen_prompts} prompts × {args.new_tokens} new tokens, batch {args.hf_gen_batch}, "
        "first batch "
        "only): "
        + "; ".join(
            f"{n.rsplit(' b', 1)[0]} {r['tok_s']:.1f} tok/s"
            for n, r in sorted(SG.items(), key=lambda kv: -kv[1]["tok_s"])
        )
        + "."
    )
    w("")
    w(f"### Prompt scope, {args.rounds} interleaved rounds")
    w("")
    w(
        "| configuration | prompt tok/s, median (min–max) | × fastest transformers, median (min–max) | "
        "peak RSS MiB | RSS / fastest transformers |"
    )
    w("|---|---:|---:|---:|---:|")
    names = {
        **{f"hf:{n}": f"transformers {n}, hooks on every `mlp.gate`" for n in contenders},
        "ftri_q8_0": "mote-local `capture_activations` Q8_0, batch_size 32 (= `mote ftri`)",
        "ftri_bf16": "mote-local `capture_activations` BF16, batch_size 32 (= `mote ftri`)",
        "ftri_q4_k_m": "mote-local `capture_activations` Q4_K_M, batch_size 32 (= `mote ftri`)",
        "ftri_capture": "mote-local `capture_activations`, `mote quantize --recipe capture` file, batch_size 32",
        "ftri_q8_0_stock_kernel": "… Q8_0 with ggml-cpu's own expert matmuls (`MOTE_MOE_GEMM=0`)",
        "ftri_bf16_stock_kernel": "… BF16 with ggml-cpu's own expert matmuls (`MOTE_MOE_GEMM=0`)",
        "ftri_q4_k_m_repack": "… Q4_K_M with llama.cpp's weight repacking (plain `Model()` options)",
        "ftri_q8_0_t1": "… Q8_0 with 1 thread",
        "proto_q8_0_ub2048": "prototype Q8_0: 64 sequences per decode, n_ubatch 2048 (Session/Capture API)",
    }
    for key, label in names.items():
        if key not in tps:
            continue
        w(
            f"| {label} | {_spread(tps[key])} | {_spread(ratio[key], '{:.2f}×')} | {rss[key]:.0f} | "
            f"{100 * rss[key] / rss[best]:.0f}% |"
        )
    w("")
    med = lambda key: float(np.median(ratio[key]))  # noqa: E731
    mem = lambda key: rss[key] / rss[best]  # noqa: E731
    w(f"- Fastest transformers configuration: {best[3:]} ({_spread(tps[best])} tok/s, {rss[best]:.0f} MiB).")
    w(
        "- **Q8_0, BF16 and `--recipe capture` each ≥ 1.5× the fastest transformers at ≤ 50% of its peak memory**: "
        + "; ".join(
            f"{label} {med(key):.2f}× at {100 * mem(key):.0f}% (throughput {verdict(med(key) >= 1.5)}, memory "
            f"{verdict(mem(key) <= 0.5)})"
            for label, key in (("Q8_0", "ftri_q8_0"), ("BF16", "ftri_bf16"), ("capture", "ftri_capture"))
            if key in tps
        )
        + "."
    )
    w(
        f"- **Q4_K_M ≥ 2×**: {med('ftri_q4_k_m'):.2f}× at {100 * mem('ftri_q4_k_m'):.0f}% "
        f"{verdict(med('ftri_q4_k_m') >= 2)}."
    )
    levers = [
        ("weight repacking at Q4_K_M", "ftri_q4_k_m_repack", "ftri_q4_k_m"),
        ("1 thread instead of 2 at Q8_0", "ftri_q8_0_t1", "ftri_q8_0"),
        ("64 sequences per decode with n_ubatch 2048 at Q8_0", "proto_q8_0_ub2048", "ftri_q8_0"),
        ("BF16 against Q8_0", "ftri_bf16", "ftri_q8_0"),
        ("the grouped expert matmul against ggml-cpu's own at Q8_0", "ftri_q8_0", "ftri_q8_0_stock_kernel"),
        ("the same at BF16", "ftri_bf16", "ftri_bf16_stock_kernel"),
    ]
    w(
        "- Levers, within a round against the product configuration of the same type, median (min–max): "
        + "; ".join(
            f"{label} {_spread(vs(a, b), '{:.2f}×')} ({rss[a]:.0f} vs {rss[b]:.0f} MiB)"
            for label, a, b in levers
            if a in tps
        )
        + ". Q8_0 and BF16 have no repacked layout on x86 in this llama.cpp (`ggml_repack_get_optimal_repack_type` "
        "repacks Q8_0 only on ARM/RISC-V), so `use_extra_bufts` changes nothing for them."
    )
    w("")
    gh = rounds[0]["gen_hf"]
    w(f"### Generated scope ({args.gen_prompts} prompts × {args.new_tokens} new tokens, greedy, same rounds)")
    w("")
    w(
        "| configuration | generated tok/s, median (min–max) | × transformers `generate`, median (min–max) | "
        "peak RSS MiB |"
    )
    w("|---|---:|---:|---:|")
    gnames = {
        "gen_hf": f"transformers `generate` {gen_best.rsplit(' b', 1)[0]} (fastest screened), batch "
        f"{args.hf_gen_batch}, left padding, same hooks",
        "gen_q8_0": f'mote-local `capture_activations(scope="generated", batch_size={args.gen_prompts})` Q8_0',
        "gen_q4_k_m": f'mote-local `capture_activations(scope="generated", batch_size={args.gen_prompts})` Q4_K_M',
    }
    for key, label in gnames.items():
        if key not in tps:
            continue
        w(f"| {label} | {_spread(tps[key], '{:.1f}')} | {_spread(vs(key, 'gen_hf'), '{:.2f}×')} | {rss[key]:.0f} |")
    w("")
    gq = {q: float(np.median(vs(f"gen_{q}", "gen_hf"))) for q in ("q8_0", "q4_k_m") if f"gen_{q}" in tps}
    w(
        "- **Generated scope ≥ 3× the fastest transformers `generate`**: "
        + ", ".join(f"{q.upper()} {g:.2f}× {verdict(g >= 3)}" for q, g in gq.items())
        + f". transformers routes {args.new_tokens - 1} of the {args.new_tokens} generated "
        f"tokens (the last never enters the model), mote-local all {args.new_tokens}; transformers ran "
        f"{gh.get('transformers')}."
    )
    w("")

    # fidelity
    n_tr = args.trace_prompts
    n_tok = sum(lens[:n_tr])
    tr = {q: load(f"trace_{q}", "trace") for q in (*QTYPES, "f32_kvf32")}
    hft = {d: load(f"hf_{d}", "trace")[:n_tok] for d in ("f32", "bf16")}
    cnt = {q: load(f"r0_ftri_{q}") for q in ("q8_0", "bf16", "q4_k_m")}
    cnt["f32"] = load("ftri_f32")
    chf = {d: load(f"hf_{d}") for d in ("f32", "bf16")}
    w("### Fidelity")
    w("")
    w(
        f"Per-token top-{k} sets: first {n_tr} prompts ({n_tok} tokens × {spec.n_layer} layers), llama.cpp with "
        f"flash attention off and, unless said, its default f16 KV cache; quantized models compared with f32 under the "
        f"same settings. transformers: {R['hf_bf16']['name']} and {R['hf_f32']['name']}. fTRI: mean_diff ranking "
        f"(positive sign, as `mote ftri` ranks) over all {len(ids)} prompts from per-prompt counts (llama.cpp: "
        f"`capture_activations`, batch_size 32, flash attention auto), top-{args.top} sets compared."
    )
    w("")
    w(
        f"| comparison | top-{k} set identical | mean set overlap | tokens identical in all layers | "
        f"fTRI top-{args.top} overlap | fTRI score corr | count corr |"
    )
    w("|---|---:|---:|---:|---:|---:|---:|")
    pairs = [
        ("llama.cpp f32, f32 KV cache vs transformers f32", tr["f32_kvf32"], hft["f32"], cnt["f32"], chf["f32"]),
        ("llama.cpp f32 (default f16 KV cache) vs transformers f32", tr["f32"], hft["f32"], cnt["f32"], chf["f32"]),
        ("transformers bf16 vs transformers f32", hft["bf16"], hft["f32"], chf["bf16"], chf["f32"]),
        ("llama.cpp BF16 vs llama.cpp f32", tr["bf16"], tr["f32"], cnt["bf16"], cnt["f32"]),
        ("llama.cpp Q8_0 vs llama.cpp f32", tr["q8_0"], tr["f32"], cnt["q8_0"], cnt["f32"]),
        ("llama.cpp Q4_K_M vs llama.cpp f32", tr["q4_k_m"], tr["f32"], cnt["q4_k_m"], cnt["f32"]),
        ("llama.cpp BF16 vs transformers bf16", tr["bf16"], hft["bf16"], cnt["bf16"], chf["bf16"]),
    ]
    fid = {}
    for name, a, b, ca, cb in pairs:
        st = top_sets_agreement(a, b)
        f = ftri_compare(ca, cb, is_behavior, args.top, k)
        fid[name] = {**st, **f}
        w(
            f"| {name} | {100 * st['set_identical']:.1f}% | {100 * st['mean_overlap']:.1f}% | "
            f"{100 * st['token_all_layers']:.1f}% | {f['top_overlap']}/{args.top} | {f['score_corr']:.3f} | "
            f"{f['count_corr']:.4f} |"
        )
    w("")
    (workdir / "results.json").write_text(
        json.dumps(
            {
                "S": S,
                "SG": SG,
                "rounds": rounds,
                "R": R,
                "fidelity": fid,
                "contenders": contenders,
                "best": best,
                "argv": argv,
            },
            indent=1,
            default=str,
        )
    )
    return "\n".join(lines)


def _tf5_version(args) -> str:
    if not (args.tf5_python and Path(args.tf5_python).exists()):
        return "no transformers 5 (absent)"
    r = subprocess.run(
        [args.tf5_python, "-c", "import transformers, torch; print(transformers.__version__, torch.__version__)"],
        capture_output=True,
        text=True,
    )
    v = r.stdout.split()
    return f"transformers {v[0]} with torch {v[1]}" if len(v) == 2 else "transformers 5 (version unreadable)"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _version(pkg: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def append_section(path: Path, report: str, section: str = SECTION) -> None:
    """Adds (or replaces) a benchmark's section (this one's by default); other sections stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if section in text:
        start = text.index(section)
        nxt = text.find("\n## ", start + len(section))
        text = text[:start] + report.rstrip() + "\n" + (text[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + report.rstrip() + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
