"""Click option groups that several lmscan commands share (one definition, one help text)."""

from __future__ import annotations

import click


def model_options(func):
    """--revision and --offline, for commands that resolve a model."""
    func = click.option("--revision", default=None, help="Hub revision (branch, tag or commit); or use ID@REV.")(func)
    func = click.option("--offline", is_flag=True, default=None, help="Never touch the network; use the HF cache.")(func)
    return func


def training_options(func):
    """--format, --device, --seed, --rules and --force, for commands that train and write --out."""
    func = click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")(func)
    func = click.option("--rules", "rules_dir", default=None,
                        help="Directory with rule files overriding the built-in ones.")(func)
    func = click.option("--seed", type=int, default=0, show_default=True)(func)
    func = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(func)
    func = click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
                        show_default=True)(func)
    return func
