"""Evaluation of a steering profile: behaviour detectors, random controls, intervals, capability cost,
the super-expert scan (``evaluate``) and the report files (``report``). Imports the layers below:
foundation, ``modelfile``, ``steering``, ``engine``."""
