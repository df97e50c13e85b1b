"""Models mote-local writes itself, for tests and the demo: tiny random MoE GGUFs of several
architectures (``tiny``) and the planted-behaviour model with its ground truth (``planted``).
Imports the foundation and ``steering``; never the engine (a model file is written, not run)."""
