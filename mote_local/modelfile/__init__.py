"""What a GGUF file says before the engine sees it: structure and hyperparameter validation (``layout``),
the model's identity for profiles (``fingerprint``), and how far its quantization moves routing, with
llama.cpp's quantizer run on per-tensor recipes that keep it (``quantize``), and models named on the Hugging
Face Hub or in an ollama store resolved to local files (``hub``). Imports only mote-local's foundation modules
(``errors``, ``atomic``, ``prompts``), the ``gguf`` package, ``huggingface_hub`` inside ``hub.resolve_hf`` alone,
and, inside ``quantize.quantize`` alone, the engine's bindings (``binding``)."""
