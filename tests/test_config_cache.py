"""Project configuration discovery/validation and the result cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmscan.scan.cache
from lmscan.scan.cache import ResultCache, default_cache_dir
from lmscan.scan.project import KNOWN_KEYS, allowlist_reason, find_config_file, load_project_config
from lmscan.errors import InputError
from lmscan.findings import DetectorRun, Finding, Report
from lmscan.report.json_report import to_dict

SHA = "ab" * 32
OTHER_SHA = "cd" * 32


@pytest.fixture
def project(tmp_path) -> Path:
    """A project root (it has .git, so discovery never walks above it)."""
    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True)
    return root


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------------- config


def test_pyproject_found_from_a_subdirectory(project):
    write(project / "pyproject.toml", '[project]\nname = "x"\n\n[tool.lmscan]\nprofile = "fast"\nfail_on = "Suspicious"\n'
                                      'device = "cuda:1"\ndetectors = ["static", "vocab-sweep"]\n')
    sub = project / "src" / "deep"
    sub.mkdir(parents=True)
    config = load_project_config(sub)
    assert config == {
        "profile": "fast", "fail_on": "suspicious", "device": "cuda:1", "detectors": ["static", "vocab-sweep"],
        "config_file": str((project / "pyproject.toml").resolve()),
    }


def test_lmscan_toml_top_level_table_and_precedence(project):
    write(project / "pyproject.toml", '[tool.lmscan]\nprofile = "from-pyproject"\n')
    write(project / "lmscan.toml", 'profile = "from-lmscan-toml"\n')
    assert load_project_config(project)["profile"] == "from-lmscan-toml"
    # a pyproject.toml without [tool.lmscan] is passed over on the way up
    write(project / "pkg" / "pyproject.toml", '[project]\nname = "pkg"\n')
    assert find_config_file(project / "pkg") == project / "lmscan.toml"


def test_cwd_is_the_default_start(project, monkeypatch):
    write(project / "lmscan.toml", 'device = "cpu"\n')
    monkeypatch.chdir(project)
    assert load_project_config()["device"] == "cpu"


def test_walk_stops_at_git_root(tmp_path):
    write(tmp_path / "lmscan.toml", 'profile = "outside"\n')
    inner = tmp_path / "repo"
    (inner / ".git").mkdir(parents=True)
    assert find_config_file(inner) is None
    assert load_project_config(inner) == {}
    (tmp_path / "plain").mkdir()
    assert load_project_config(tmp_path / "plain")["profile"] == "outside"


def test_explicit_config_wins(project, tmp_path):
    write(project / "lmscan.toml", 'profile = "discovered"\n')
    explicit = write(tmp_path / "ci" / "scan.toml", 'profile = "explicit"\n')
    assert load_project_config(project, explicit=explicit)["profile"] == "explicit"
    explicit_py = write(tmp_path / "other" / "pyproject.toml", '[tool.lmscan]\nprofile = "explicit-py"\n')
    assert load_project_config(project, explicit=explicit_py)["profile"] == "explicit-py"
    with pytest.raises(InputError, match="no \\[tool.lmscan\\]"):
        load_project_config(project, explicit=write(tmp_path / "x" / "pyproject.toml", '[project]\nname = "x"\n'))
    with pytest.raises(InputError, match="no such file"):
        load_project_config(project, explicit=tmp_path / "missing.toml")


def test_relative_paths_are_relative_to_the_config_file(project, tmp_path, monkeypatch):
    (project / "my-rules").mkdir()
    write(project / "lmscan.toml", 'rules = "my-rules"\ncache_dir = ".results"\n')
    (project / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # not the config file's directory
    config = load_project_config(project / "a" / "b")
    assert config["rules"] == str((project / "my-rules").resolve())
    assert config["cache_dir"] == str((project / ".results").resolve())
    write(project / "lmscan.toml", 'rules = "nope"\n')
    with pytest.raises(InputError, match="not a directory"):
        load_project_config(project)


@pytest.mark.parametrize("text, match", [
    ('profile = "x"\nprofiel = "y"\n', "unknown lmscan setting"),
    ('fail_on = "sometimes"\n', "fail_on"),
    ('device = "tpu"\n', "device"),
    ('detectors = "static"\n', "detectors"),
    ('detectors = []\n', "detectors"),
    ('profile = ""\n', "profile"),
    ('profile = [1\n', "invalid TOML"),
    ('allowlist = {sha256 = "x"}\n', "array of tables"),
])
def test_bad_config_is_an_input_error(project, text, match):
    write(project / "lmscan.toml", text)
    with pytest.raises(InputError, match=match):
        load_project_config(project)


def test_unknown_key_error_lists_known_keys(project):
    write(project / "pyproject.toml", '[tool.lmscan]\nthreshold = 3\n')
    with pytest.raises(InputError) as info:
        load_project_config(project)
    message = str(info.value)
    assert "threshold" in message and all(key in message for key in KNOWN_KEYS)


def test_bad_toml_in_pyproject_is_an_input_error(project):
    write(project / "pyproject.toml", "[tool.lmscan\n")
    with pytest.raises(InputError, match="invalid TOML"):
        load_project_config(project)


def test_allowlist(project):
    write(project / "pyproject.toml", f"""
[tool.lmscan]
[[tool.lmscan.allowlist]]
sha256 = "{SHA.upper()}"
reason = "  red-team fixture with a known backdoor  "
model = "org/planted"

[[tool.lmscan.allowlist]]
sha256 = "{OTHER_SHA}"
reason = "benchmark model"
""")
    config = load_project_config(project)
    assert config["allowlist"][0] == {"sha256": SHA, "reason": "red-team fixture with a known backdoor",
                                      "model": "org/planted"}
    assert allowlist_reason(config, SHA) == "red-team fixture with a known backdoor"
    assert allowlist_reason(config, SHA.upper()) == "red-team fixture with a known backdoor"
    assert allowlist_reason(config, OTHER_SHA) == "benchmark model"
    assert allowlist_reason(config, "ef" * 32) is None
    assert allowlist_reason({}, SHA) is None
    assert allowlist_reason(config, "") is None


@pytest.mark.parametrize("entry, match", [
    (f'sha256 = "{SHA}"', "reason is required"),
    (f'sha256 = "{SHA}"\nreason = "   "', "reason is required"),
    (f'sha256 = "{SHA}"\nreason = 3', "reason is required"),
    ('reason = "ok"', "sha256"),
    ('sha256 = "abc123"\nreason = "ok"', "64 hex"),
    (f'sha256 = "{"g" * 64}"\nreason = "ok"', "64 hex"),
    (f'sha256 = "{SHA}"\nreason = "ok"\nexpires = "2027"', "unknown key"),
])
def test_allowlist_entries_are_validated(project, entry, match):
    write(project / "pyproject.toml", f"[tool.lmscan]\n[[tool.lmscan.allowlist]]\n{entry}\n")
    with pytest.raises(InputError, match=match):
        load_project_config(project)


# ----------------------------------------------------------------------- cache


def sample_report(verdict="backdoored") -> Report:
    finding = Finding(detector="vocab-sweep", rule_id="LMS101", title="trigger-token-collapses-features",
                      severity="critical", verdict="backdoored", message="'zq' collapses sentences.", site="cls",
                      score=0.02, threshold=0.2, evidence={"triggers": ["zq"]})
    return Report(
        schema_version="1.0", tool={"name": "lmscan", "version": "0.1.0"},
        model={"ref": "x", "model_sha256": SHA, "weight_sha256": {"model.safetensors": SHA}},
        config={"profile": "default"}, seed=0, device="cpu",
        detectors=[DetectorRun(name="vocab-sweep", status="ok", seconds=1.0, sites=["cls"], findings=[finding])],
        verdict=verdict, severity="critical", timings={"total": 1.0},
    )


def ident(weights=SHA, **over) -> dict:
    """A scan identity as lmscan.scan.cache.scan_identity builds it (the parts a test varies)."""
    return {"weights": {"model.safetensors": weights}, "files": {"config.json": OTHER_SHA},
            "scan": {"profile": "default", "detectors": ["static", "vocab-sweep"], "sites": ["cls"]},
            "settings": {"vocab-sweep": {"batch_size": 512}}, **over}


def test_cache_key_is_deterministic_and_covers_what_decides_the_result(tmp_path):
    cache = ResultCache(tmp_path)
    key = cache.key(ident())
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache.key(dict(reversed(list(ident().items())))) == key  # key order does not matter
    assert ResultCache(tmp_path / "elsewhere").key(ident()) == key
    assert cache.key(ident(weights=OTHER_SHA)) != key
    assert cache.key(ident(files={"config.json": SHA})) != key
    assert cache.key(ident(settings={"vocab-sweep": {"batch_size": 256}})) != key
    with pytest.raises(ValueError):
        cache.key({"weights": {}})


def test_scan_identity_covers_files_rules_probes_and_code(tmp_path, monkeypatch):
    """The parts of a real identity: a changed config or tokenizer file, rules content,
    probe corpus or lmscan version each change the key."""
    import shutil

    from lmscan.api import ScanConfig, plan_scan
    from lmscan.scan.cache import scan_identity
    from tests.conftest import FIXTURES

    model = tmp_path / "m"
    shutil.copytree(FIXTURES / "tiny-bert", model)
    cache = ResultCache(tmp_path / "c")

    def key(config: ScanConfig) -> str:
        return cache.key(scan_identity(plan_scan(config)))

    base = ScanConfig(model=str(model), device="cpu")
    first = key(base)
    assert key(base) == first
    (model / "vocab.txt").write_text("\n".join(reversed((model / "vocab.txt").read_text().splitlines())) + "\n")
    second = key(base)
    assert second != first  # the tokenizer changed
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "profiles.toml").write_text("[fast.verify]\ncollapse_threshold = 0.2\n")
    assert key(ScanConfig(model=str(model), device="cpu", rules_dir=str(rules))) != second
    (rules / "profiles.toml").write_text("")
    (rules / "policy.toml").write_text('[fail_on]\ndefault = "suspicious"\n')
    assert key(ScanConfig(model=str(model), device="cpu", rules_dir=str(rules))) != second
    probes = tmp_path / "probes.txt"
    probes.write_text("one sentence here.\nanother one there.\n" * 300)
    assert key(ScanConfig(model=str(model), device="cpu", probes_file=str(probes))) != second
    monkeypatch.setattr(lmscan.scan.cache, "__version__", "9.9.9")
    assert key(base) != second


def test_cache_put_get_clear(tmp_path):
    cache = ResultCache(tmp_path / "cache")
    key = cache.key(ident())
    assert cache.get(key) is None
    assert cache.clear() == 0
    report = sample_report()
    assert cache.put(key, report) is True
    assert report.from_cache is False
    cached = cache.get(key)
    assert cached is not None and cached.from_cache is True
    assert cached.verdict == "backdoored"
    assert cached.detectors[0].findings[0].evidence == {"triggers": ["zq"]}
    assert to_dict(cached) == {**to_dict(report), "from_cache": True}
    assert [p.name for p in (tmp_path / "cache" / "results").iterdir()] == [f"{key}.json"]  # no temp files left

    second = cache.key(ident(weights=OTHER_SHA))
    cache.put(second, sample_report("clean"))
    cache.put(key, sample_report("suspicious"))  # replaces the entry
    assert cache.get(key).verdict == "suspicious"
    assert cache.clear() == 2
    assert cache.get(key) is None and cache.get(second) is None


@pytest.mark.parametrize("content", [
    "{not json",
    "",
    json.dumps({"format": 1, "key": "0" * 64, "report": {}}),  # another key's entry
    None,  # a valid entry for this key with a broken report, filled in below
    b"\xff\xfe\x00garbage",
])
def test_corrupt_cache_entry_is_a_miss_and_is_deleted(tmp_path, content):
    cache = ResultCache(tmp_path)
    key = cache.key(ident())
    path = cache.path(key)
    path.parent.mkdir(parents=True)
    if content is None:
        content = json.dumps({"format": lmscan.scan.cache.CACHE_FORMAT, "key": key,
                              "report": {**to_dict(sample_report()), "schema_version": "0.1"}})
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    assert cache.get(key) is None
    assert not path.exists()
    assert cache.put(key, sample_report()) and cache.get(key) is not None


def test_cache_get_with_a_bad_key_is_a_miss(tmp_path):
    assert ResultCache(tmp_path).get("../../etc/passwd") is None


def test_cache_put_to_an_unwritable_place_reports_false(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = ResultCache(blocker)
    assert cache.put(cache.key(ident()), sample_report()) is False
    assert cache.get(cache.key(ident())) is None


def test_default_cache_dir_order(tmp_path, monkeypatch):
    monkeypatch.delenv("LMSCAN_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "lmscan"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lmscan"
    assert default_cache_dir({"cache_dir": str(tmp_path / "cfg")}) == tmp_path / "cfg"
    monkeypatch.setenv("LMSCAN_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir({"cache_dir": str(tmp_path / "cfg")}) == tmp_path / "env"
    assert ResultCache().dir == tmp_path / "env"
    assert ResultCache.from_config({"cache_dir": "ignored"}).dir == tmp_path / "env"
