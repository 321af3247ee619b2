#!/usr/bin/env python
"""Run a benchmark and print its table; with --write-docs also write it into docs/benchmarks.md
and its numbers into docs/benchmarks.json.

    python tools/benchmark.py attention                # one benchmark, table printed
    python tools/benchmark.py --write-docs attention   # and its docs section rewritten
    python tools/benchmark.py all                      # every benchmark, CPU-sized defaults
    python tools/benchmark.py attention --help         # its options
"""
import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: the benchmarks package

from benchmarks import BENCHMARKS, load  # noqa: E402
from benchmarks.report import machine_description, write_section  # noqa: E402
from benchmarks.results import take, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"),
                        help="markdown file whose section for the benchmark --write-docs rewrites; its .json "
                             "twin gets the section's numbers")
    parser.add_argument("--write-docs", action="store_true",
                        help="rewrite the benchmark's section of --doc and its .json twin (default: print only)")
    sub = parser.add_subparsers(dest="name", required=True)
    sub.add_parser("all", help="every benchmark with its defaults")
    for name in BENCHMARKS:
        load(name).add_arguments(sub.add_parser(name, help=load(name).__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        module = load(name)
        bench_args = args if args.name == name else sub.choices[name].parse_args([])
        # a benchmark that draws files for the docs writes them beside --doc, and only with --write-docs
        bench_args.doc, bench_args.write_docs = args.doc, args.write_docs
        take()  # forget numbers a failed earlier run may have left
        section = module.run(bench_args)
        print(section)
        if args.write_docs:
            device = str(getattr(bench_args, "device", "cpu")).split(":")[0]
            section_name = getattr(bench_args, "section", None) or f"{name}-{device}"
            write_section(args.doc, section_name, section)
            write_json(args.doc.with_suffix(".json"), section_name, device,
                       machine_description(torch.device(device)), take())


if __name__ == "__main__":
    main()
