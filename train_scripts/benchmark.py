#!/usr/bin/env python3
"""Benchmark a timm model against another in one run: speed, memory, FLOPs. See docs/benchmarks.md."""
from timm_ait.benchmark import main

if __name__ == '__main__':
    main()
