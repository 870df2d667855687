"""Benchmarks (speed, memory, composition fidelity); each writes its JSON under ``RESULTS``."""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
