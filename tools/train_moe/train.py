"""Train the small Qwen3-MoE of mote_local/data/trained on the Debian Reference in five languages.

Seeded and deterministic for a given torch version and thread count (the recipe pins both): a byte-level BPE
vocabulary trained on the corpus (tokenizers), then transformers' Qwen3MoeForCausalLM from random weights,
AdamW with warm-up and cosine decay, the router's load-balancing loss on. Writes a Hugging Face model folder
(config, safetensors, tokenizer) that tools/train_moe/convert.py turns into a GGUF, and train_log.json.

    python3 tools/train_moe/train.py --data build/trained/data --out build/trained/hf
    python3 tools/train_moe/train.py --measure 5      # seconds per step of this configuration, then stop

Needs the optional training packages: torch (CPU), transformers 4.57, tokenizers, safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

BOS, EOS = "<|bos|>", "<|eos|>"


def train_tokenizer(text_path: Path, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2's split regex and byte-level alphabet: llama.cpp's "gpt-2" pre-tokenizer is exactly this
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(text_path)], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": 1 << 20,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}, indent=2))
    return tok


def model_config(vocab_size: int, args):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        intermediate_size=args.expert_ffn * 2,
        moe_intermediate_size=args.expert_ffn,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=args.ctx,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=args.aux,
        bos_token_id=0,
        eos_token_id=1,
        attention_dropout=0.0,
        use_cache=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("build/trained/data"))
    ap.add_argument("--out", type=Path, default=Path("build/trained/hf"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-ffn", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=128, help="Training sequence length (also the model's context).")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--aux", type=float, default=0.01, help="Router load-balancing loss coefficient.")
    ap.add_argument("--measure", type=int, default=0, help="Run this many steps, print seconds per step, stop.")
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    started = time.time()
    text_path = args.data / "train.txt"
    tok = train_tokenizer(text_path, args.vocab, args.out)
    bos = tok.token_to_id(BOS)
    units = text_path.read_text(encoding="utf-8").split("\n\n")
    ids: list[int] = []
    for enc in tok.encode_batch(units):
        ids.append(bos)
        ids.extend(enc.ids)
    stream = torch.tensor(ids, dtype=torch.long)
    print(
        f"tokenizer: {tok.get_vocab_size()} tokens, {len(stream)} training tokens ({time.time() - started:.0f} s)",
        flush=True,
    )

    config = model_config(tok.get_vocab_size(), args)
    model = Qwen3MoeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    steps = args.measure or args.steps

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    rng = np.random.default_rng(args.seed)
    log = []
    model.train()
    t0 = time.time()
    window = []
    for step in range(steps):
        starts = rng.integers(0, len(stream) - args.ctx - 1, size=args.batch)
        batch = torch.stack([stream[s : s + args.ctx] for s in starts])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lm = float(out.loss.detach() - config.router_aux_loss_coef * out.aux_loss.detach())
        window.append(lm)
        if (step + 1) % 25 == 0 or step + 1 == steps:
            entry = {
                "step": step + 1,
                "loss": round(float(np.mean(window)), 4),
                "aux": round(float(out.aux_loss), 4),
                "lr": lr_at(step),
                "elapsed_s": round(time.time() - t0, 1),
            }
            log.append(entry)
            window = []
            print(json.dumps(entry), flush=True)
    per_step = (time.time() - t0) / steps
    if args.measure:
        print(f"{per_step:.2f} s per step ({args.batch} x {args.ctx} tokens)")
        return
    model.eval()
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.save_pretrained(args.out, safe_serialization=True)
    (args.out / "train_log.json").write_text(
        json.dumps(
            {
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "torch": torch.__version__,
                "training_tokens": len(stream),
                "parameters": n_params,
                "seconds": round(time.time() - started),
                "seconds_per_step": round(per_step, 3),
                "log": log,
            },
            indent=1,
        )
    )
    print(f"saved {args.out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
