"""Benchmarks: `alto bench overhead|streaming` (results in bench/results/, BENCHMARKS.md)."""
