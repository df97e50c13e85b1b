"""`mote serve`: llama.cpp's llama-server, built with this package's engine, in which every request may carry its
own expert steering and ask for its own routing (the logic is native: native/mote-server.cpp). This package only
launches it: the command line and its checks (``launcher``) and the click command (``command``).

The top layer beside ``cli``: imports the engine, steering, modelfile and the foundation; never ``cli``."""
