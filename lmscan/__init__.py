"""lmscan: find task-agnostic backdoors in pretrained language models."""

__version__ = "0.1.0"
