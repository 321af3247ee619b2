"""Shared pieces of the benchmark tests: one torch thread, a benchmark's parsed options, its table."""
import argparse
from pathlib import Path
from types import ModuleType

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread (import this fixture into a test module to apply it to every test):
    on a 2-core CPU shared with other jobs, two threads that wait on each other make tiny steps
    take seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def benchmark_args(module: ModuleType, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by the options of benchmark ``module`` (as ``tools/benchmark.py NAME`` does,
    without --write-docs)."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.doc, args.write_docs = Path("docs/benchmarks.md"), False
    return args


def table_rows(section: str) -> list[list[str]]:
    """The cells of each row of the (first) markdown table in ``section``, header excluded."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
