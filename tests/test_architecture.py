"""The house rules of the code, checked: detectors share through lmscan.evidence, never through
each other; no module takes another's private names; a detector's declared rules are the truth;
one `lmscan check` plans its scan once."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from click.testing import CliRunner

from lmscan import detectors
from lmscan.cli import main
from lmscan.scan.rules import load_catalog
from tests.conftest import FIXTURES

PACKAGE = Path(__file__).resolve().parents[1] / "lmscan"
# What every detector may import from its own folder: the contract and the registry.
DETECTOR_SHARED = {"lmscan.detectors", "lmscan.detectors.base"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file, function-level imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def test_no_detector_imports_another_detector():
    offenders = []
    for path in sorted((PACKAGE / "detectors").glob("*.py")):
        if path.name in ("__init__.py", "base.py"):
            continue
        for module, names in imports(path):
            if module.startswith("lmscan.detectors") and module not in DETECTOR_SHARED:
                offenders.append(f"{module_name(path)} imports {module}")
            if module == "lmscan.detectors" and set(names) - {"get", "names", "check_names"}:
                offenders.append(f"{module_name(path)} imports {names} from the registry")
    assert offenders == []


def test_no_module_imports_a_private_name_of_another():
    offenders = [f"{module_name(path)} imports {name} from {module}"
                 for path in sorted(PACKAGE.rglob("*.py"))
                 for module, names in imports(path) if module.startswith("lmscan")
                 for name in names if name.startswith("_") and not name.startswith("__")]
    assert offenders == []


def test_every_detector_declares_rules_the_catalog_defines_and_the_catalog_names_real_detectors():
    catalog = load_catalog(None)
    declared = {name: set(detectors.get(name).rule_ids) for name in detectors.names()}
    for name, rule_ids in declared.items():
        assert rule_ids, f"{name} declares no rule"
        assert rule_ids <= set(catalog), f"{name} declares rules the catalog lacks: {rule_ids - set(catalog)}"
        assert detectors.get(name).summary, f"{name} has no summary"
    for rule_id, entry in catalog.items():
        owner = entry.get("detector")
        assert owner in declared and rule_id in declared[owner], f"{rule_id}: detector {owner!r} does not declare it"


def test_a_detector_that_emits_an_undeclared_rule_fails_its_stage():
    from lmscan.findings import DetectorRun, Finding
    from lmscan.scan.stages import apply_catalog

    run = DetectorRun("static", "ok", findings=[Finding(detector="static", rule_id="LMS101", message="x")])
    try:
        apply_catalog(run, load_catalog(None))
    except Exception as exc:  # noqa: BLE001 - the message is what matters
        assert "does not declare" in str(exc)
    else:
        raise AssertionError("an undeclared rule passed")


def test_one_check_plans_its_scan_once(monkeypatch):
    """Through the public entry points: the request is checked once, bound to the model once,
    and the policy and the model's config.json are each read once."""
    import lmscan.api
    import lmscan.report.verdict
    import lmscan.scan.plan

    calls = {"check_request": 0, "plan": 0, "load_policy": 0, "config.json": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    check_request = counting("check_request", lmscan.scan.plan.check_request)
    monkeypatch.setattr(lmscan.scan.plan, "check_request", check_request)
    monkeypatch.setattr(lmscan.api, "check_request", check_request)
    monkeypatch.setattr(lmscan.scan.plan.ScanRequest, "plan", counting("plan", lmscan.scan.plan.ScanRequest.plan))
    monkeypatch.setattr(lmscan.report.verdict, "load_policy", counting("load_policy", lmscan.report.verdict.load_policy))
    monkeypatch.setattr(lmscan.scan.plan, "read_json_object",
                        counting("config.json", lmscan.scan.plan.read_json_object))
    result = CliRunner().invoke(main, ["check", str(FIXTURES / "tiny-bert"), "--detectors", "vocab-sweep",
                                       "--format", "json", "--no-cache", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verdict"] == "clean"
    assert calls == {"check_request": 1, "plan": 1, "load_policy": 1, "config.json": 1}


def test_the_detectors_command_lists_each_detector_from_its_declaration():
    result = CliRunner().invoke(main, ["detectors", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert list(rows) == detectors.names()
    assert rows["vocab-sweep"]["can_clear"] and "fast" in rows["vocab-sweep"]["profiles"]
    assert rows["pv-mining"]["profiles"] == ["standard", "thorough"]
    assert rows["files"]["rules"] == ["LMS003", "LMS004", "LMS005", "LMS006", "LMS007"]
    # Detectors verified on encoders only say so; the file and weight checks read any model.
    assert rows["vocab-sweep"]["families"] == ["encoder"] and rows["static"]["families"] == ["encoder", "decoder"]
