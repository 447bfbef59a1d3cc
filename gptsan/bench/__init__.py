"""Helpers shared by the benchmark scripts (scripts/bench_*.py); nothing in the library uses them."""
import json

from gptsan import fileio


def print_report(report, path=None):
    """Prints a benchmark's JSON report and, with `path`, also writes it there (atomic)."""
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if path:
        fileio.write_json_atomic(path, report, indent=2)
