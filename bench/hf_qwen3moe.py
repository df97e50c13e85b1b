"""A random Qwen3-MoE checkpoint in HF transformers format, its GGUF twins, and router hooks.

Helper of bench_ftri.py. The checkpoint is built with transformers (random weights, router rows scaled
so that routing has clear margins), saved with ``save_pretrained`` next to a byte-level BPE tokenizer
(Qwen2's pre-tokenizer, trained with `tokenizers` on a small word corpus), converted to GGUF f32 with
``convert_hf_to_gguf.py`` from the pinned llama.cpp (extracted at run time from the cached llama-cpp-python
sdist into a temporary folder, never into the repository), then quantized to Q8_0 and Q4_K_M with
``llama_model_quantize`` from the engine's own bindings.

The pinned converter names a BPE vocabulary's pre-tokenizer by hashing the ids it gives on a probe text and
refuses hashes it does not know; a freshly trained vocabulary cannot have a known hash, so the converter runs
through a small wrapper that answers "qwen2" (the regex this tokenizer really uses) where the lookup fails.
Nothing else of the converter is touched.

torch and transformers are bench-only dependencies: they are imported inside the functions that need them,
so that the llama.cpp workers never load torch (their peak RSS stays their own).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
_VENDOR = "llama_cpp_python-0.3.36/vendor/llama.cpp/"


@dataclass(frozen=True)
class HfSpec:
    hidden: int = 1024
    n_layer: int = 8
    n_expert: int = 64
    n_expert_used: int = 8
    moe_ff: int = 512
    n_head: int = 16
    n_head_kv: int = 4
    head_dim: int = 64
    vocab: int = 4096  # model vocabulary; the BPE trained on the word corpus uses fewer ids
    router_logit_std: float = 4.0  # std of router logits on RMS-normalised input ("clear margins")
    seed: int = 1234

    def key(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------


def corpus(words: list[str], n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic sentences over a word list (the tokenizer's training text and the prompts' source)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 24)
        s = " ".join(rng.choice(words) for _ in range(n))
        lines.append(s[0].upper() + s[1:] + rng.choice([".", "?", "!", ","]))
    return lines


# the pre-tokenizer regex of Qwen2/Qwen3 (llama.cpp's "qwen2" pre-tokenizer)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(out_dir: Path, words: list[str], vocab: int) -> int:
    """A byte-level BPE with Qwen2's pre-tokenizer, trained on the word corpus; saved as tokenizer.json.

    Returns the number of ids it uses (the model's vocabulary is padded up to `vocab`).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(words), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return tok.get_vocab_size()


# ------------------------------------------------------------------------------------------------------
# HF model
# ------------------------------------------------------------------------------------------------------


def hf_config(spec: HfSpec, vocab: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=4 * spec.hidden,
        num_hidden_layers=spec.n_layer,
        num_attention_heads=spec.n_head,
        num_key_value_heads=spec.n_head_kv,
        head_dim=spec.head_dim,
        num_experts=spec.n_expert,
        num_experts_per_tok=spec.n_expert_used,
        moe_intermediate_size=spec.moe_ff,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,  # llama.cpp's qwen3moe graph always renormalises the top-k weights
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=True,
    )


def build_checkpoints(spec: HfSpec, words: list[str], dir_f32: Path, dir_bf16: Path) -> dict:
    """Random Qwen3MoeForCausalLM saved twice (f32 for the converter, bf16 as researchers load it)."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    for d in (dir_f32, dir_bf16):
        d.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(dir_f32, words, spec.vocab)
    for f in dir_f32.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (dir_bf16 / f.name).write_bytes(f.read_bytes())
    torch.manual_seed(spec.seed)
    config = hf_config(spec, spec.vocab)
    model = Qwen3MoeForCausalLM(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w.copy_(torch.randn(w.shape, generator=gen) * (spec.router_logit_std / spec.hidden**0.5))
    model.save_pretrained(dir_f32, safe_serialization=True)
    model.to(torch.bfloat16).save_pretrained(dir_bf16, safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return {"vocab": spec.vocab, "vocab_used": vocab, "n_params": n_params}


# ------------------------------------------------------------------------------------------------------
# Conversion and quantization
# ------------------------------------------------------------------------------------------------------


def sdist_path() -> Path:
    for env in ("MOTE_LOCAL_SDIST", "MOTE_SDIST"):
        p = os.environ.get(env)
        if p and Path(p).is_file():
            return Path(p)
    p = Path.home() / ".cache" / "mote-local" / "sdist" / SDIST_NAME
    if not p.is_file():
        raise FileNotFoundError(
            f"the pinned sdist {SDIST_NAME} is not cached at {p}; the engine build puts it "
            "there (or set MOTE_LOCAL_SDIST)"
        )
    return p


_WRAPPER = """\
import runpy, sys
root = {root!r}
sys.path[:0] = [root + "/gguf-py", root]
import conversion.base as base
_lookup = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return _lookup(self, tokenizer)
    except NotImplementedError:  # a freshly trained vocabulary: its pre-tokenizer is Qwen2's regex
        return "qwen2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_to_gguf(hf_dir: Path, out: Path, outtype: str = "f32") -> None:
    """convert_hf_to_gguf.py of the pinned llama.cpp, extracted to a temp dir for this call only."""
    with tempfile.TemporaryDirectory(prefix="mote-convert-") as tmp:
        with tarfile.open(sdist_path()) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name == _VENDOR + "convert_hf_to_gguf.py"
                or m.name.startswith(_VENDOR + "gguf-py/")
                or m.name.startswith(_VENDOR + "conversion/")
            ]
            tar.extractall(tmp, members=members, filter="data")
        root = Path(tmp) / _VENDOR
        wrapper = Path(tmp) / "convert_wrapper.py"
        wrapper.write_text(_WRAPPER.format(root=str(root)))
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        r = subprocess.run(
            [sys.executable, str(wrapper), str(hf_dir), "--outtype", outtype, "--outfile", str(out)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
        )
        if r.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed ({r.returncode}):\n{r.stderr[-4000:]}")


FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def quantize(src: Path, dst: Path, qtype: str, nthread: int = 0) -> None:
    """llama_model_quantize from the engine's bindings (what llama-quantize runs), no extra build."""
    from mote_local_engine.llama_cpp import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, FTYPES[qtype])
    params.nthread = nthread
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src.name} -> {qtype}) failed with code {rc}")


# ------------------------------------------------------------------------------------------------------
# Router hooks (what researchers do today)
# ------------------------------------------------------------------------------------------------------


class RouterHooks:
    """forward hooks on every ``mlp.gate``: the top-k expert ids of every token the router saw, per call.

    transformers 5.x's router module returns (logits, weights, ids); 4.x's gate is a plain ``nn.Linear``
    whose output is the logits, from which the block takes the top-k of the float softmax: the hook does
    the same, so that it reads the block's own selection (ties included).
    """

    def __init__(self, model):
        self.calls: list[list] = []  # one entry per model forward: [layer] -> LongTensor [tokens, k]
        self._current: list | None = None
        self._handles = []
        self.k = model.config.num_experts_per_tok
        layers = model.model.layers
        for i, layer in enumerate(layers):
            self._handles.append(layer.mlp.gate.register_forward_hook(self._hook(i)))
        self.n_layer = len(layers)

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if isinstance(output, tuple):
                ids = output[2]
            else:
                import torch

                ids = torch.softmax(output, dim=-1, dtype=torch.float).topk(self.k, dim=-1).indices
            if i == 0:
                self._current = [None] * self.n_layer
                self.calls.append(self._current)
            self._current[i] = ids.detach()

        return hook

    def clear(self) -> None:
        self.calls.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
