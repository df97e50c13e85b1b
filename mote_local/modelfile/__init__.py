"""What a GGUF file says before the engine sees it: structure and hyperparameter validation (``layout``),
the model's identity for profiles (``fingerprint``), and how far its quantization moves routing, with
llama.cpp's quantizer run on per-tensor recipes that keep it (``quantize``). Imports only mote-local's
foundation modules (``errors``, ``atomic``, ``prompts``), the ``gguf`` package, and, inside
``quantize.quantize`` alone, the engine's bindings (``binding``)."""
