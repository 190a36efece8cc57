"""Rendering of results: terminal (rich), JSON and SARIF."""
