""" The README's main job: train a small AiT on generated Triangle data on the CPU, then validate it.

    python train_scripts/demo.py            # minutes on 2 cores (docs/training.md)
    python train_scripts/demo.py --quick    # a one-minute smoke run

Generates the Triangle data (cached under ./data), trains ``ait_tiny_patch32_64`` (AiT with two
blocks of width 128: 0.84M parameters) with the training loop (timm_ait.train), evaluates the best checkpoint
with the validation (timm_ait.train.validate) at batch size 1, as the paper does, and prints the test accuracy.
Everything lands in ./output/demo.
"""
import argparse
import os
import time

import torch

from ..cpu_speed import keep_freed_memory
from . import loop, validate
from .run_dir import new_run_name

# Sized for minutes on 2 cores: the tiny AiT sees about ten times the images AiT-Small would in that
# time (docs/training.md). lr 1e-3 with clipping at norm 1 is the recipe of the Hub test fixture
# (tests/fixtures/README.md).
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
    run = new_run_name()  # two demos started in one second get two folders
    # one thread: a model this small gains nothing from more, and the loader worker needs the other core
    torch.set_num_threads(1)
    # reuse freed tensors instead of faulting their pages in again every step: less CPU time, the same
    # run bit for bit (tests/test_cpu_speed.py); the loader worker inherits it
    keep_freed_memory()
    common = ['--model', MODEL, '--dataset', 'triangle', '--data-dir', args.data_dir]
    print(f'== Training {MODEL} on {s["train"]} generated Triangle images for {s["epochs"]} epochs (CPU)', flush=True)
    start = time.time()
    loop.main([*common, '--epochs', str(s['epochs']), '--warmup-epochs', '1', '--sched-on-updates', '--lr', str(s['lr']),
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


