"""The scan pipeline: a request resolved once into a plan (plan.py), detectors run as stages
(stages.py), results cached (cache.py), project settings and rules read (project.py, rules.py),
many models at once (fleet.py), and stop signals turned into partial reports (interrupts.py)."""
