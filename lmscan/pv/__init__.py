"""Predefined vectors for deployment: the full search behind export-pvs (search.py), the .pvs
file (pvs_file.py), and the runtime monitor that flags triggered inputs (monitor.py)."""
