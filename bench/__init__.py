"""Benchmarks: `python bench/train_throughput.py` (training speed) and `python bench/prep_speed.py` (data prep)."""
