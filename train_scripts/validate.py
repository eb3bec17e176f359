#!/usr/bin/env python3
"""Top-1 / top-5 of a checkpoint or a pretrained model on a dataset, as JSON: see docs/training.md."""
from timm_ait.train.validate import cli

if __name__ == '__main__':
    cli()
