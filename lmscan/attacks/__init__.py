"""Backdoor planting (POR, NeuBA, BToP styles) for tests, benchmarks and red-teaming."""
