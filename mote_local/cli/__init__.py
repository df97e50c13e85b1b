"""The ``mote`` command (``commands``) and its chat REPL (``chat``): the top layer, which may import
every other; nothing imports it."""
