"""`mote serve`: an OpenAI-compatible HTTP server in which every request may carry its own expert steering
and ask for its own routing. Request/response types (``types``), settings (``settings``), routes (``app``),
the slot scheduler (``scheduler``), per-request sampling and text (``sampling``), steering fields
(``steering``), routing accounts (``routing``) and the click command (``command``).

The top layer beside ``cli``: imports the engine, steering, modelfile and the foundation; never ``cli``.
The web stack (FastAPI, uvicorn) is imported only by ``app`` and when the command runs."""
