"""The bench summary as Markdown, with the machine it ran on."""

from __future__ import annotations

import os
import time


def machine_info(device: str, threads: int | None) -> dict:
    import platform

    import torch

    from lmscan import __version__

    info = {"lmscan": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "threads": threads or torch.get_num_threads(), "device": device,
            "date": time.strftime("%Y-%m-%d")}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def to_markdown(summary: dict) -> str:
    m = summary["machine"]
    lines = [f"## lmscan bench: {summary['zoo']} ({summary['profile']} profile)", "",
             f"{m['date']}, lmscan {m['lmscan']}, torch {m['torch']}, device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else f", {m['threads']} thread(s) of {m['cpu_count']} CPUs"), "",
             "| model | expected | engine | verdict | scan s | peak RSS MB | per detector (flagged, PVs, triggers, s) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["results"]:
        parts = []
        for name, d in (r.get("detectors") or {}).items():
            bits = ["flagged" if d["flagged"] else "-"]
            if "true_pvs" in d:
                bits.append(f"PVs {d['pvs_recovered']}/{d['true_pvs']}")
                bits.append(f"triggers {d['triggers_named']}+{d['triggers_partly_named'] - d['triggers_named']}p/"
                            f"{d['triggers']}")
            if "target_named" in d:
                bits.append("target named" if d["target_named"] else "target not named")
            if "converged" in d:
                bits.append(f"converged {d['converged']}/{d['optimisations']}")
            if d.get("seconds") is not None:
                bits.append(f"{d['seconds']:.1f} s")
            parts.append(f"{name}: " + ", ".join(bits))
        lines.append(f"| {r['model']} | {r['expected']} | {r['engine']} | {r['verdict'] or r['status']} | "
                     f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {'; '.join(parts)} |")
    lines += ["", "| engine | scope | accuracy | false pos. | false neg. | suspicious | PV recall | triggers named | "
              "mean s | worst s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for engine, block in summary["summary"].items():
        for scope, s in [("scan", block["overall"]), *block["detectors"].items()]:
            accuracy = f"{s['accuracy']:.0%}" if s["accuracy"] is not None else "n/a"
            lines.append(f"| {engine} | {scope} | {accuracy} ({s['judged']}/{s['models']} judged) | "
                         f"{s['false_positives']} | {s['false_negatives']} | {s['suspicious'] if scope == 'scan' else ''} | "
                         f"{s.get('pv_recall', '')} | "
                         f"{s.get('triggers_named', '')} | {_num(s['mean_seconds'])} | {_num(s['worst_seconds'])} |")
    if summary["comparison"]:
        lines += ["", "| model | engines | same verdict | scan time ratio | pv-mining time ratio |", "|---|---|---|---|---|"]
        for c in summary["comparison"]:
            lines.append(f"| {c['model']} | {' vs '.join(c['engines'])} | {'yes' if c['same_verdict'] else 'NO'} | "
                         f"{'≥ ' if c['ratio_is_lower_bound'] else ''}{_num(c['time_ratio'])}× | "
                         f"{_num(c['pv_mining_ratio'])}× |")
    if summary["search"]:
        lines += ["", "| model (search) | status | true PVs recovered | PVs in file | s |", "|---|---|---|---|---|"]
        for s in summary["search"]:
            lines.append(f"| {s['model']} | {s['status']} | {s.get('pvs_recovered', '')}/{s.get('true_pvs', '')} | "
                         f"{s.get('pvs_total', '')} | {s['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:g}"
