#!/usr/bin/env python3
""" The README's main job: train a small AiT on generated Triangle data on the CPU, then validate it.

    python train_scripts/demo.py            # about 8 minutes on 2 cores
    python train_scripts/demo.py --quick    # a one-minute smoke run

Generates the Triangle data (cached under ./data), trains ``ait_tiny_patch32_64`` (AiT with two
blocks of width 128: 0.84M parameters) with train_scripts/train.py, evaluates the best checkpoint
with train_scripts/validate.py at batch size 1, as the paper does, and prints the test accuracy.
Everything lands in ./output/demo.
"""
import argparse
import os
import sys
import time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import train  # noqa: E402
import validate  # noqa: E402
from timm_ait.cpu_speed import keep_freed_memory  # noqa: E402

# Sized for minutes on 2 cores: the tiny AiT trains at about 1,300 images/s on one core with a
# loader worker on the other. AiT-Small (15.7M) trains at about 150 images/s there and was at 77%
# after 11 minutes; the tiny model sees ten times the images in that time. lr 1e-3 with clipping
# at norm 1 is the recipe of the Hub test fixture (tests/fixtures/README.md).
FULL = dict(epochs=6, train=100000, val=2000, lr=1e-3, batch=128)
QUICK = dict(epochs=1, train=2048, val=256, lr=1e-3, batch=64)
MODEL = 'ait_tiny_patch32_64'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='a one-minute smoke run')
    parser.add_argument('--output', default='output/demo')
    parser.add_argument('--data-dir', default='data')
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    run = datetime.now().strftime('%Y%m%d-%H%M%S')
    # one thread: a model this small gains nothing from more, and the loader worker needs the other core
    torch.set_num_threads(1)
    # reuse freed tensors instead of faulting their pages in again every step: 6% less CPU time a
    # step, and the same run bit for bit (tests/test_cpu_speed.py); the loader worker inherits it
    keep_freed_memory()
    common = ['--model', MODEL, '--dataset', 'triangle', '--data-dir', args.data_dir]
    print(f'== Training {MODEL} on {s["train"]} generated Triangle images for {s["epochs"]} epochs (CPU)', flush=True)
    start = time.time()
    train.main([*common, '--epochs', str(s['epochs']), '--warmup-epochs', '1', '--sched-on-updates', '--lr', str(s['lr']),
                '--clip-grad', '1.0', '-b', str(s['batch']), '--train-num-samples', str(s['train']), '--val-num-samples', str(s['val']),
                '--workers', '1', '--device', 'cpu', '--log-interval', '100', '--output', args.output,
                '--experiment', run])
    minutes = (time.time() - start) / 60
    best = os.path.join(args.output, run, 'model_best.pth.tar')
    print(f'== Validating {best} on {s["val"]} test images at batch size 1', flush=True)
    results = validate.main([*common, '--checkpoint', best, '--num-samples', str(s['val']), '-b', '1', '-j', '0',
                             '--device', 'cpu', '--results-file', os.path.join(args.output, run, 'validate.json')])
    print(f'== {MODEL} reached {results["top1"]:.2f}% test accuracy on Triangle after {minutes:.1f} minutes of '
          f'training; run folder: {os.path.join(args.output, run)}')


if __name__ == '__main__':
    main()
