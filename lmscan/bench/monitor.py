"""Benchmark: what the PV monitor costs when attached to a model's forward pass.

    python -m lmscan.bench.monitor --pvs model.pvs --model DIR [--batch 32] [--length 128] [--device cpu]

Builds a sequence classifier on the model's encoder, then times forward passes of
the same batch with and without the monitor hook (interleaved, so drifts in the
machine's speed hit both alike), and the hook's own time between two timer hooks.
Overhead = the hook's median time / the plain forward's median time (the difference
of the two forward medians is below CPU timing noise). Prints one JSON line.
"""

from __future__ import annotations

import json
import statistics
import time

import click
import torch


def _timed(classifier, batch, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        classifier(**batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(pvs_path: str, model_dir: str, batch_size: int, length: int, repeats: int, device_name: str) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmscan.models import quiet_transformers
    from lmscan.models.device import pick_device
    from lmscan.models.probes import load_builtin_probes
    from lmscan.pv.monitor import PVMonitor
    from lmscan.pv.pvs_file import read_pvs

    quiet_transformers()
    device = pick_device(device_name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    classifier = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval().to(device)
    texts = [" ".join(load_builtin_probes()[i : i + 4]) for i in range(0, 4 * batch_size, 4)]
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt").to(device)
    monitor = PVMonitor(read_pvs(pvs_path))
    base_model = getattr(classifier, "base_model", classifier)
    hook_seconds: list[float] = []
    clock = {}

    def before(*_):  # registered before the monitor's hook, so it runs just before it
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        clock["start"] = time.perf_counter()

    def after(*_):  # registered after it: the difference is the monitor's own time
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        hook_seconds.append(time.perf_counter() - clock["start"])

    plain, hooked = [], []
    for _ in range(3):  # warm-up
        _timed(classifier, batch, device)
    for _ in range(repeats):
        plain.append(_timed(classifier, batch, device))
        handles = [base_model.register_forward_hook(before), monitor.attach(classifier),
                   base_model.register_forward_hook(after)]
        hooked.append(_timed(classifier, batch, device))
        for handle in handles:
            handle.remove()
    base, with_monitor, own = statistics.median(plain), statistics.median(hooked), statistics.median(hook_seconds)
    return {"device": str(device), "batch": batch_size, "length": length, "repeats": repeats,
            "pvs": len(monitor.pvset.pvs), "forward_ms": round(base * 1000, 2),
            "with_monitor_ms": round(with_monitor * 1000, 2), "monitor_hook_ms": round(own * 1000, 3),
            "overhead_percent": round(100 * own / base, 3)}


@click.command()
@click.option("--pvs", "pvs_path", required=True)
@click.option("--model", "model_dir", required=True, help="Checkpoint directory the classifier is built on.")
@click.option("--batch", "batch_size", type=int, default=32, show_default=True)
@click.option("--length", type=int, default=128, show_default=True)
@click.option("--repeats", type=int, default=30, show_default=True)
@click.option("--device", "device_name", default="auto", show_default=True)
def main(pvs_path, model_dir, batch_size, length, repeats, device_name):
    click.echo(json.dumps(measure(pvs_path, model_dir, batch_size, length, repeats, device_name)))


if __name__ == "__main__":
    main()
