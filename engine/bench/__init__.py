"""``depth-engine bench``: figures to reproduce before a job (see engine.bench.runner)."""
from engine.bench.runner import BenchConfig, parse_sizes, print_report, run_bench

__all__ = ["BenchConfig", "parse_sizes", "print_report", "run_bench"]
