"""One folder per function; each ``main.py`` is a thin adapter over a core in ``shared``."""
