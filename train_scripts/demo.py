#!/usr/bin/env python3
"""The README's main job: train a small AiT on generated Triangle data on the CPU, then validate it."""
from timm_ait.train.demo import main

if __name__ == '__main__':
    main()
