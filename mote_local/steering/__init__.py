"""Steering as data: entries and modes (``entries``), their text syntax (``spec``), and profiles with their
JSON and GGUF formats (``profile``). Imports the foundation and ``modelfile``; never the engine.

``Entry``, ``Mode`` and ``Scope`` are re-exported here: they are the public names of the Python API."""

from mote_local.steering.entries import Entry, Mode, Scope

__all__ = ["Entry", "Mode", "Scope"]
