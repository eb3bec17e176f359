""" Top-1 / top-5 of a checkpoint or a pretrained model on a dataset, printed as JSON.

    python train_scripts/validate.py --model ait_small_patch32_64 --dataset triangle \
        --checkpoint output/train/demo/model_best.pth.tar -b 1

The model runs in eval mode: its memory is frozen and a sample's prediction does not depend on
the rest of its batch, so any batch size gives the same result (the paper evaluates with 1).
A checkpoint is evaluated on its run's data (dataset, folder, seed, split names, normalisation) unless
the command line says otherwise, and the results record which weights they are of (checkpoint, its
digest and epoch, EMA or not, the weights' digest), which push_to_hub.py checks.
"""
import argparse
import logging
import sys
import time

import torch

from timm.data import create_loader, resolve_data_config
from timm.utils import ParseKwargs, setup_default_logging

from ..checkpoint import DIGEST_KEY, content_digest
from ..data.factory import (
    DATASETS, QUESTION_ANSWERING, SPLITS, check_model_inputs, check_num_classes, create_ait_dataset,
    dataset_is_generated, resolve_split,
)
from ..data.sort_of_clevr import QUESTION_TYPES
from ..hub import PretrainedDownloadError
from ..layers import GlobalWorkspaceLayer
from ..memory_probe import SWAPS, memory_swapped
from ..run_model import LoadedRun, load_run_model
from .evaluate import amp_context, evaluate, report_results

_logger = logging.getLogger('validate')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='timm-ait validation',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--model', default=None, help="timm model name (default: the checkpoint's)")
    parser.add_argument('--checkpoint', default='', metavar='PATH', help='training checkpoint or state dict')
    parser.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of the checkpoint')
    parser.add_argument('--pretrained', action='store_true', help='published weights (Hugging Face Hub)')
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    parser.add_argument('--dataset', '-d', default=None,
                        help=f"one of {list(DATASETS)} (default: the checkpoint's; needed without one)")
    parser.add_argument('--data-dir', default=None,
                        help="dataset root (default: the checkpoint's run's, when it is the run's dataset)")
    parser.add_argument('--split', default=None,
                        help=f"split to evaluate, one of {list(SPLITS)} or an image folder's subfolder (default: the "
                             "checkpoint's run's --val-split, else validation)")
    parser.add_argument('--train-split', default=None,
                        help="an image folder's training split, whose class folders number the classes "
                             "(default: the checkpoint's, else train)")
    parser.add_argument('--dataset-download', action='store_true')
    parser.add_argument('--num-samples', type=int, default=None,
                        help='size of the set (generated), or a random subset of N drawn from --seed')
    parser.add_argument('--seed', type=int, default=None,
                        help="seed of a generated dataset (default: the checkpoint's run's, else 42, as in training)")
    parser.add_argument('--sort-of-clevr-questions', default='all', choices=('all', 'relational', 'non_relational'),
                        help='which Sort-of-CLEVR questions to ask (with all, both kinds are also reported apart)')
    parser.add_argument('-b', '--batch-size', type=int, default=256)
    parser.add_argument('-j', '--workers', type=int, default=2)
    parser.add_argument('--amp', action='store_true')
    parser.add_argument('--amp-dtype', default='bfloat16')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--memory-swaps', nargs='*', default=None, choices=SWAPS, metavar='SWAP',
                        help=f"also evaluate with every GWL's memory swapped (one of {list(SWAPS)}; none given: "
                             "all that apply): a model that uses its memory loses accuracy (timm_ait.memory_probe)")
    parser.add_argument('--results-file', default='',
                        help='also write the JSON here; it records which weights were measured (push_to_hub.py '
                             'checks them)')
    return parser


def load_model(args) -> LoadedRun:
    """The model to validate, through the one loader: a checkpoint's is rebuilt with the settings it was
    trained with (its training args); the command line may repeat them but not contradict them. The run's
    dataset, and on it the run's data folder, seed and split names, fill the flags the command line left unset."""
    loaded = load_run_model(args.checkpoint, model=args.model, model_kwargs=args.model_kwargs,
                            num_classes=args.num_classes, pretrained=args.pretrained, use_ema=args.use_ema)
    args.model = loaded.settings['model']
    run = loaded.train_args
    if args.dataset is None:
        if not run.get('dataset'):
            raise ValueError(f'--dataset is needed (one of {list(DATASETS)}): '
                             + ('the checkpoint records no training args' if args.checkpoint else 'no checkpoint'))
        args.dataset = run['dataset']
    if args.dataset not in DATASETS:
        raise ValueError(f'unknown dataset {args.dataset!r}; expected one of {list(DATASETS)}')
    runs_dataset = run.get('dataset') == args.dataset
    if args.data_dir is None and runs_dataset:
        args.data_dir = run.get('data_dir')
    if args.seed is None:
        args.seed = run.get('seed', 42) if runs_dataset else 42
    if args.split is None:
        args.split = (run.get('val_split') if runs_dataset else None) or 'validation'
    if args.train_split is None:
        args.train_split = run.get('train_split') or 'train'
    try:  # a misspelt split must not fall back to another one
        resolve_split(args.dataset, args.split, args.data_dir)
    except (ValueError, OSError) as e:
        raise type(e)(f'--split {args.split!r}: {e}') from None
    check_model_inputs(loaded.model, args.model, args.dataset)
    return loaded


def measured_weights(loaded: LoadedRun, args) -> dict:
    """Which weights a result is of, for the results file: the checkpoint (its path, digest and epoch), EMA or
    not, and the digest of the weights themselves (push_to_hub.py refuses results of other weights)."""
    checkpoint = loaded.checkpoint or {}
    return dict(checkpoint=args.checkpoint or None, checkpoint_digest=checkpoint.get(DIGEST_KEY),
                epoch=checkpoint.get('epoch'), use_ema=args.use_ema,
                weights_digest=content_digest(loaded.model.state_dict()))


def memory_swap_metrics(model, loader, device, args, dataset, groups) -> dict:
    """The evaluation again with every GWL's memory swapped, for each swap asked (the stored memory is put back)."""
    memories = [m.memory.memory for m in model.modules() if isinstance(m, GlobalWorkspaceLayer)]
    if not memories:
        raise ValueError(f'--memory-swaps: {args.model} has no GlobalWorkspaceLayer, so no memory to swap')
    one_shape = len(memories) > 1 and len({tuple(m.shape) for m in memories}) == 1
    swaps = args.memory_swaps or [s for s in SWAPS if s != 'other_layer' or one_shape]
    results = {}
    for swap in swaps:
        with memory_swapped(model, swap, seed=args.seed):
            results[swap] = evaluate(model, loader, device, amp_context(args.amp, args.amp_dtype, device),
                                     getattr(dataset, 'is_relational', None), groups)
    return results


def validate(args) -> dict:
    device = torch.device(args.device)
    loaded = load_model(args)
    weights = measured_weights(loaded, args)
    model = loaded.model.to(device).eval()
    # the run's normalisation (--mean/--std/...), as its own evaluation used it
    data_config = resolve_data_config({**loaded.data_settings(), **vars(args)}, model=model)
    embed = getattr(model, 'patch_embed', None) or getattr(model, 'stem', None)
    if getattr(model, 'pretrained_cfg', {}).get('fixed_input_size') and hasattr(embed, 'img_size'):
        # a fixed-size model rebuilt with its run's img_size reads images of that size, not its cfg's
        data_config['input_size'] = (data_config['input_size'][0], *embed.img_size)
    dataset = create_ait_dataset(args.dataset, root=args.data_dir, split=args.split, download=args.dataset_download,
                                 num_samples=args.num_samples, seed=args.seed,
                                 questions=args.sort_of_clevr_questions, train_split=args.train_split)
    check_num_classes(model, dataset, args.dataset)
    two_inputs = args.dataset in QUESTION_ANSWERING
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], num_workers=args.workers, device=device,
        use_prefetcher=device.type == 'cuda' and not two_inputs, persistent_workers=False)
    # Sort-of-CLEVR: top-1 of each kind of question too (nearest, farthest, count, ...)
    question_type = getattr(dataset, 'question_type', None)
    groups = None if question_type is None else {
        name: question_type == i for i, name in enumerate(QUESTION_TYPES)}
    start = time.time()
    metrics = evaluate(model, loader, device, amp_context(args.amp, args.amp_dtype, device),
                       getattr(dataset, 'is_relational', None), groups)
    if args.memory_swaps is not None:
        for swap, swapped in memory_swap_metrics(model, loader, device, args, dataset, groups).items():
            metrics.update({f'{swap}_memory_{k}': v for k, v in swapped.items()})
    results = dict(
        model=args.model, **weights, pretrained=args.pretrained, dataset=args.dataset,
        split=args.split, num_samples=len(dataset),
        **({'seed': args.seed} if dataset_is_generated(args.dataset) else {}),
        **({'questions': args.sort_of_clevr_questions} if two_inputs else {}), batch_size=args.batch_size,
        param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        **{k: round(float(v), 4) for k, v in metrics.items()},
        seconds=round(time.time() - start, 2),
    )
    return results


def main(argv=None) -> dict:
    setup_default_logging()
    args = build_parser().parse_args(argv)
    results = validate(args)
    try:
        report_results(results, args.results_file)
    except OSError as e:  # a write or close that fails (a full disk) does not name the file
        if e.filename is not None or not args.results_file:
            raise
        raise OSError(e.errno, f'cannot write --results-file {args.results_file!r}: {e.strerror or e}') from e
    return results


def cli(argv=None) -> None:
    """``main`` for the command line: a bad request ends in one line and exit code 2."""
    try:
        main(argv)
    except (ValueError, TypeError, OSError, PretrainedDownloadError) as e:  # OSError: missing files, a failed download
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
