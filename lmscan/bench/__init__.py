"""`lmscan bench ZOO` (zoo.py, runner.py, recipes.py, scoring.py, report.py): build a zoo of clean and backdoored models, scan each with every
engine, and measure verdicts, recovered PVs and named triggers against the ground truth
the plants wrote, and time.

A zoo is a TOML file (bundled: ``rules/zoos/tiny.toml``, ``rules/zoos/minilm.toml``)::

    [zoo]
    base = "minilm"                 # model every entry starts from (paths: relative to this file)
    plant_rules = "..."             # optional --rules directory for `lmscan plant`
    [scan]
    profile = "fast"
    engines = ["fast", "reference"] # names in rules/engines.toml or [engines.NAME] below
    detectors = [...]               # optional (default: the profile's)
    time_limit = 1800               # seconds per scan; a scan over it is reported, not judged
    search = false                  # also run `lmscan export-pvs` on backdoored models (PV recall)
    [engines.NAME]                  # optional variant: extends = "reference", [engines.NAME.pv-mining] ...
    [[models]]
    name = "por"
    attack = "por"                  # por | neuba | btop; absent: a clean model
    num_triggers = 6                # or triggers = ["velvet thunder"]
    seed = 11
    [[models]]
    name = "benign"
    finetune = "sentiment"          # a clean fine-tune on a labelled task (no poisoning)

Models are built through the real CLI in subprocesses and cached by their recipe and the
planting code; every scan is a `lmscan check` subprocess (wall time and peak RSS measured
per process). A model counts as flagged when the verdict is ``backdoored``.
"""
