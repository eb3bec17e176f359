#!/usr/bin/env python3
"""Train AiT, or any timm model (timm's flag names): see docs/training.md. The code is timm_ait.train."""
from timm_ait.train.loop import cli

if __name__ == '__main__':
    cli()
