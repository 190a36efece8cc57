"""Detectors: each takes a loaded model and returns a DetectorRun with findings; none prints."""
