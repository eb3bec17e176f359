#!/usr/bin/env python3
""" The README's main job: train AiT-Small on generated Triangle data on the CPU, then validate it.

    python train_scripts/demo.py            # about 10 minutes on 2 cores
    python train_scripts/demo.py --quick    # a one-minute smoke run

Generates the Triangle data (cached under ./data), trains ``ait_small_patch32_64`` with
train_scripts/train.py, evaluates the best checkpoint with train_scripts/validate.py at batch
size 1, as the paper does, and prints the test accuracy. Everything lands in ./output/demo.
"""
import argparse
import os
import sys
import time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import train  # noqa: E402
import validate  # noqa: E402

# Sized for about 10 minutes on 2 cores (AiT-Small trains at about 150 images/s there): the
# paper's recipe scaled to a few epochs, with a per-update warm-up and a higher peak rate.
FULL = dict(epochs=4, train=20000, val=2000, lr=5e-4, batch=128)
QUICK = dict(epochs=1, train=1024, val=256, lr=5e-4, batch=64)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='a one-minute smoke run')
    parser.add_argument('--output', default='output/demo')
    parser.add_argument('--data-dir', default='data')
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    run = datetime.now().strftime('%Y%m%d-%H%M%S')
    common = ['--model', 'ait_small_patch32_64', '--dataset', 'triangle', '--data-dir', args.data_dir]
    print(f'== Training AiT-Small on {s["train"]} generated Triangle images for {s["epochs"]} epochs (CPU)', flush=True)
    start = time.time()
    train.main([*common, '--epochs', str(s['epochs']), '--warmup-epochs', '1', '--sched-on-updates', '--lr', str(s['lr']),
                '-b', str(s['batch']), '--train-num-samples', str(s['train']), '--val-num-samples', str(s['val']),
                '--workers', '0', '--device', 'cpu', '--log-interval', '25', '--output', args.output,
                '--experiment', run])
    minutes = (time.time() - start) / 60
    best = os.path.join(args.output, run, 'model_best.pth.tar')
    print(f'== Validating {best} on {s["val"]} test images at batch size 1', flush=True)
    results = validate.main([*common, '--checkpoint', best, '--num-samples', str(s['val']), '-b', '1', '-j', '0',
                             '--device', 'cpu', '--results-file', os.path.join(args.output, run, 'validate.json')])
    print(f'== AiT-Small reached {results["top1"]:.2f}% test accuracy on Triangle after {minutes:.1f} minutes of '
          f'training; run folder: {os.path.join(args.output, run)}')


if __name__ == '__main__':
    main()
