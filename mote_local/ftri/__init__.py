"""fTRI: routing capture over prompt sets and what is made of it.

- ``capture``: the routing of every prompt on the engine, counted over a token scope (``open_capture_model``
  loads a model the way capture runs fastest);
- ``stats``: the scores, intervals and ranking (pure numpy, no engine import);
- ``export``: the steering profile a result supports;
- ``outputs``: ftri.json and the typed ``Ranking`` read back from it, CSVs, heatmaps, the terminal table.

A new analysis puts its capture beside ``capture``, its result type beside ``stats`` and its rendering in
``outputs``. Imports the layers below: foundation, ``modelfile``, ``steering``, ``engine``."""
