"""Flower App for benchmarks/flower_round_overhead.py (ServerApp + sleeping ClientApp)."""
