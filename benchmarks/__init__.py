"""fdistill benchmarks (run ``python benchmarks/bench_distill.py --help``)."""
