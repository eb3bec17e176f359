#!/usr/bin/env python3
"""Analyse an AiT's memory on a batch of images (attention maps, diversity, energy): see docs/results.md."""
from timm_ait.analyze import cli

if __name__ == '__main__':
    cli()
