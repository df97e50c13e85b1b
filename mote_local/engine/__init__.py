"""The patched llama.cpp: the only ctypes bindings of ``native/mote.h`` (``binding``) and the model,
session and routing capture built on them (``model``). Imports the foundation, ``modelfile`` and
``steering``; nothing above.

``Model`` and ``Session`` are re-exported here: they are the public names of the Python API."""

from mote_local.engine.model import Capture, Generation, Model, RoutingStats, RoutingTrace, Session, open_model

__all__ = ["Capture", "Generation", "Model", "RoutingStats", "RoutingTrace", "Session", "open_model"]
