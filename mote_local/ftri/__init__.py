"""fTRI: routing capture over prompt sets (``runner``: capture, table, JSON/CSV/heatmap, profile export)
and its statistics (``stats``: pure numpy, no engine import). Imports the layers below: foundation,
``modelfile``, ``steering``, ``engine``."""
