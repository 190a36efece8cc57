"""The built-in rule files, installed as the package ``lmscan.rules`` (see pyproject.toml).

A regular package so that ``importlib.resources.files("lmscan.rules")`` is a plain
directory both in an editable install and in a wheel.
"""
