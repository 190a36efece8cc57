"""What several lmscan commands share: click option groups (one definition, one help text),
the stderr console and the comma-list parser."""

from __future__ import annotations

import click

from lmscan.report.console import OutputConsole

# Progress, logs and notes go here; stdout carries only the report or machine output.
stderr = OutputConsole(stderr=True)


def split_option(value: str | None) -> list[str] | None:
    """A comma-separated option as a list (None when not given or empty)."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


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


def labelled_data_options(func):
    """--train, --text-column and --label-column, for commands that train on labelled data."""
    func = click.option("--label-column", default="label", show_default=True, help="Column/field with the label.")(func)
    func = click.option("--text-column", default="text", show_default=True, help="Column/field with the text.")(func)
    func = click.option("--train", "train_file", required=True,
                        help='Labelled data (.csv, .tsv or .jsonl), or "sentiment" for the bundled task.')(func)
    return func


def emit_training_report(result, fmt: str, print_table) -> dict:
    """What a command that trains and writes --out prints: where it wrote, then the report
    (the JSON, or ``print_table``'s table) on stdout."""
    import json

    report = result.report
    stderr.print(f"wrote {result.out_dir} ({report['seconds']} s)")
    if fmt == "json":
        click.echo(json.dumps(report, indent=1))
    else:
        print_table(report)
    return report
