"""lmscan: find backdoors in pretrained language models.

The command is ``lmscan``; the distribution is ``lmscan-backdoor`` (the name ``lmscan`` on
PyPI belongs to an unrelated project, so ``pip install lmscan`` would install that instead).
"""

__version__ = "0.1.0"
DISTRIBUTION = "lmscan-backdoor"
