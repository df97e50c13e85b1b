"""Peak RSS of fTRI prompt-scope capture (capture_activations, batch 32, the planted prompt set: 36 + 36 prompts)
on a tiny qwen3moe with the factory's small vocabulary or Qwen's 151,936 tokens, copying every routed token's
logits out (keep, the old path) or routing only. python bench/ftri_memory.py tiny|qwen3 keep|route"""

import resource
import sys

from mote_local.engine import Model
from mote_local.engine.model import Session
from mote_local.ftri import capture
from mote_local.prompts import load_prompt_set, select_classes
from mote_local.synthetic import planted, tiny

vocab, keep = sys.argv[1], sys.argv[2] == "keep"
if keep:  # the old path: every routed token's logits copied out
    route = Session.route
    Session.route = lambda self, seqs, keep_logits=True: route(self, seqs, keep_logits=True)
path = tiny.tiny_model("qwen3moe", **({"vocab": "qwen3", "qtype": "q8_0"} if vocab == "qwen3" else {}))
b, n = select_classes(load_prompt_set(planted.prompts_path()), "trigger", "neutral")
with Model(path, n_threads=1) as m:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = capture.capture_activations(m, b, n, chat=False, batch_size=32, show_progress=False)
print(
    vocab,
    "keep" if keep else "routing-only",
    "peak RSS MiB",
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    "before capture",
    base // 1024,
)
