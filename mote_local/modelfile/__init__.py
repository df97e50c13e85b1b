"""What a GGUF file says before the engine sees it: structure and hyperparameter validation (``layout``),
and the model's identity for profiles (``fingerprint``). Imports only mote-local's foundation modules
(``errors``, ``atomic``, ``prompts``) and the ``gguf`` package."""
