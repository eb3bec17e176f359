#!/usr/bin/env python3
""" Train AiT, or any timm model, on one CPU or many GPUs with timm's machinery and flag names.

    python train_scripts/train.py --model ait_small_patch32_64 --dataset triangle --epochs 2
    torchrun --nproc_per_node=8 train_scripts/train.py -c train_scripts/configs/ait_small_patch4_32-cifar10.yaml \
        --data-dir /data/cifar --dataset-download

The loss is cross-entropy plus ``--balance-loss-coef`` times the bottleneck attention balance loss
(timm_ait.task.AiTClassificationTask). Each epoch's metrics, the balance loss among them, go to
summary.csv in the output folder beside timm's columns, with the mean cosine between memory slots
(train_memory_slot_cos: 1 when the memory has collapsed to one prior); checkpoints are written by timm's
CheckpointSaver (atomically: a file is complete or absent), each with a digest of its contents that a
resume checks. Every random draw of an epoch (data order, augmentation, dropout) is seeded by
(--seed, epoch, rank), so a resumed run continues as the uninterrupted one would. A resume takes the
run's settings from its checkpoint; the command line may change how the run continues (--epochs,
the data folder, logging, ...) but not the model or the resumed optimizer's settings.

The run stops, leaving its checkpoints as they are, at the first non-finite training loss; a
distributed run stops when a rank does not answer for --dist-timeout seconds.
"""
import argparse
import csv
import logging
import math
import os
import re
import sys
import time
from collections import OrderedDict
from datetime import datetime, timedelta

import torch
import yaml

import timm
from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    AverageMeter, ModelEmaV3, NativeScaler, ParseKwargs, dispatch_clip_grad, init_distributed_device, is_primary,
    random_seed, reduce_tensor, setup_default_logging, update_summary,
)
from timm.utils.distributed import is_distributed_env, world_info_from_env

import timm_ait
from timm_ait.data.factory import (
    DATASETS, FRESH_EACH_EPOCH, check_num_classes, create_ait_dataset, dataset_needs_no_aug,
)
from timm_ait.checkpoint import DigestCheckpointSaver
from timm_ait.engine import (
    MODEL_SETTINGS, amp_context, check_state_dict, evaluate, load_training_checkpoint, model_build_kwargs,
    check_checkpoint_arch, model_state_dict, resolve_model_settings, state_digest, to_device,
)
from timm_ait.task import DEFAULT_BALANCE_LOSS_COEF, AiTClassificationTask

_logger = logging.getLogger('train')

# flags that say how this invocation runs, not what the run computes: a resume never takes them from
# the checkpoint, and they may differ from it
PER_INVOCATION = ('config', 'resume', 'no_resume_opt', 'initial_checkpoint', 'pretrained', 'experiment', 'output',
                  'device', 'dist_backend', 'dist_timeout', 'workers', 'pin_mem', 'log_interval', 'dataset_download',
                  'torchcompile')
# what a resumed optimizer state fixes (timm's schedule starts from the state's initial_lr)
OPTIMIZER_SETTINGS = ('opt', 'lr', 'weight_decay', 'momentum', 'opt_eps', 'opt_betas')
# the files of a run folder that hold a complete checkpoint (tmp.pth.tar is one being written)
CHECKPOINT_FILE = re.compile(r'^(last|model_best|checkpoint-\d+)\.pth\.tar$')


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss (or weights): the run stops, its checkpoints untouched."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='timm-ait training', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of defaults (flag names as keys)')
    group = parser.add_argument_group('Dataset')
    group.add_argument('--dataset', '-d', default='triangle', metavar='NAME', help=f'one of {list(DATASETS)}')
    group.add_argument('--data-dir', default=None, metavar='DIR', help='dataset root (cache folder for generated data)')
    group.add_argument('--train-split', default='train')
    group.add_argument('--val-split', default='validation')
    group.add_argument('--dataset-download', action='store_true', help='let torchvision download the dataset')
    group.add_argument('--train-num-samples', type=int, default=None, help='size of the training set (generated) or its first N')
    group.add_argument('--fresh-train-data', action='store_true',
                       help='a new generated training set each epoch, drawn from (--seed, epoch) (triangle; the '
                            "authors' Triangle draws a new image at every access); epoch 0 is the cached set")
    group.add_argument('--val-num-samples', type=int, default=None, help='size of the validation set (generated) or its first N')
    group.add_argument('--sort-of-clevr-questions', default='all', choices=('all', 'relational', 'non_relational'),
                       help='which Sort-of-CLEVR questions to train on (evaluation reports both kinds)')
    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='ait_small_patch32_64', help='timm model name')
    group.add_argument('--pretrained', action='store_true')
    group.add_argument('--initial-checkpoint', default='', metavar='PATH', help='start from these weights')
    group.add_argument('--resume', default='', metavar='PATH', help='resume model, memory, optimizer, EMA, epoch')
    group.add_argument('--no-resume-opt', action='store_true')
    group.add_argument('--num-classes', type=int, default=None)
    group.add_argument('--img-size', type=int, default=None)
    group.add_argument('--mean', type=float, nargs='+', default=None)
    group.add_argument('--std', type=float, nargs='+', default=None)
    group.add_argument('--interpolation', default='')
    group.add_argument('--crop-pct', type=float, default=None)
    group.add_argument('-b', '--batch-size', type=int, default=128)
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None)
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='e.g. bottleneck=64 gwl=False')
    group.add_argument('--grad-checkpointing', action='store_true')
    group.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND')
    group = parser.add_argument_group('Optimizer and schedule')
    group.add_argument('--opt', default='adamw')
    group.add_argument('--opt-eps', type=float, default=None)
    group.add_argument('--opt-betas', type=float, nargs='+', default=None)
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--weight-decay', type=float, default=0.01)
    group.add_argument('--clip-grad', type=float, default=None)
    group.add_argument('--clip-mode', default='norm')
    group.add_argument('--sched', default='cosine')
    group.add_argument('--lr', type=float, default=1e-4)
    group.add_argument('--warmup-lr', type=float, default=1e-5)
    group.add_argument('--min-lr', type=float, default=1e-6)
    group.add_argument('--epochs', type=int, default=100)
    group.add_argument('--warmup-epochs', type=int, default=5)
    group.add_argument('--cooldown-epochs', type=int, default=0)
    group.add_argument('--decay-epochs', type=float, default=30)
    group.add_argument('--decay-rate', type=float, default=0.1)
    group.add_argument('--sched-on-updates', action='store_true', help='step the schedule every optimizer update')
    group.add_argument('--grad-accum-steps', type=int, default=1)
    group.add_argument('--balance-loss-coef', type=float, default=DEFAULT_BALANCE_LOSS_COEF,
                       help='lambda of the bottleneck attention balance loss')
    group.add_argument('--reset-memory-each-epoch', action='store_true',
                       help="the paper's 'reset memory' ablation (also set by --model-kwargs ablation=reset_memory)")
    group = parser.add_argument_group('Augmentation and regularization')
    group.add_argument('--no-aug', action='store_true', help='no training augmentation (default for generated data)')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0])
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.])
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--color-jitter', type=float, default=0.4)
    group.add_argument('--aa', default=None, help='AutoAugment policy, e.g. rand-m9-mstd0.5')
    group.add_argument('--reprob', type=float, default=0.)
    group.add_argument('--mixup', type=float, default=0.)
    group.add_argument('--cutmix', type=float, default=0.)
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', default='batch')
    group.add_argument('--smoothing', type=float, default=0.)
    group.add_argument('--drop', type=float, default=0.)
    group.add_argument('--drop-path', type=float, default=None)
    group = parser.add_argument_group('EMA')
    group.add_argument('--model-ema', action='store_true')
    group.add_argument('--model-ema-decay', type=float, default=0.9998)
    group.add_argument('--model-ema-warmup', action='store_true')
    group = parser.add_argument_group('Misc')
    group.add_argument('--seed', type=int, default=42)
    group.add_argument('--log-interval', type=int, default=50)
    group.add_argument('--checkpoint-hist', type=int, default=3)
    group.add_argument('-j', '--workers', type=int, default=2)
    group.add_argument('--pin-mem', action='store_true')
    group.add_argument('--amp', action='store_true', help='mixed precision (autocast)')
    group.add_argument('--amp-dtype', default='float16', help='float16 or bfloat16')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    group.add_argument('--dist-backend', default=None, help='default: nccl on CUDA, gloo on CPU')
    group.add_argument('--dist-timeout', type=float, default=None, metavar='SECONDS',
                       help='stop a distributed run when a rank does not answer for this long (default: '
                            "torch's, 30 minutes for gloo, 10 for nccl)")
    group.add_argument('--output', default='./output/train', metavar='DIR')
    group.add_argument('--experiment', default='', help='name of the run folder under --output')
    group.add_argument('--eval-metric', default='top1')
    return parser


def _read_config(parser, argv):
    """The YAML config named by -c (a dict of flag names), and the other arguments."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    known, remaining = config_parser.parse_known_args(argv)
    cfg = {}
    if known.config:
        if not os.path.isfile(known.config):
            parser.error(f'config file {known.config!r} does not exist')
        try:
            with open(known.config) as f:
                cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            where = getattr(e, 'problem_mark', None)
            parser.error(f'config {known.config!r} is not valid YAML'
                         + (f' (line {where.line + 1}, column {where.column + 1}: {e.problem})' if where else f': {e}'))
        if not isinstance(cfg, dict):
            parser.error(f'config {known.config!r} must be a mapping of flag names to values, got a '
                         f'{type(cfg).__name__}')
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - dests)
        if unknown:
            parser.error(f'config {known.config!r} has unknown keys {unknown}; keys are flag names with underscores')
    return known.config, cfg, remaining


def parse_args(argv=None):
    parser = build_parser()
    config, cfg, remaining = _read_config(parser, argv)
    parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = config
    return args


def given_args(argv=None) -> set:
    """The flags the command line or the -c config set (as opposed to parser defaults)."""
    parser = build_parser()
    unset = object()
    parser.set_defaults(**{a.dest: unset for a in parser._actions if a.dest != 'help'})
    _, cfg, remaining = _read_config(parser, argv)
    args = parser.parse_args(remaining)
    return {k for k, v in vars(args).items() if v is not unset} | set(cfg)


def apply_checkpoint_settings(args, given: set, checkpoint: dict) -> None:
    """A resumed run continues with the settings it was trained with (the checkpoint's args).

    A flag not given is taken from the checkpoint. A given one that differs is refused, naming it, if
    it would change the model (or, with the optimizer state resumed, an optimizer setting that state
    fixes); other differences (--epochs, -b, the schedule, ...) are honoured and logged.
    """
    saved = vars(checkpoint.get('args') or argparse.Namespace())
    if not saved:
        return  # a checkpoint of another tool: the command line says what it is (check_state_dict guards)
    what = f'--resume {args.resume!r}'
    requested = {k: getattr(args, k) for k in MODEL_SETTINGS if k in given}
    for key, value in resolve_model_settings(saved, requested, what).items():
        setattr(args, key, value)
    changed = []
    for key in sorted({a.dest for a in build_parser()._actions} - set(PER_INVOCATION) - set(MODEL_SETTINGS)):
        if key not in saved or key == 'help':
            continue
        if key not in given:
            setattr(args, key, saved[key])
        elif getattr(args, key) != saved[key]:
            if key in OPTIMIZER_SETTINGS and not args.no_resume_opt:
                flag = '--' + key.replace('_', '-')
                raise ValueError(f'optimizer setting {key}: {what} was trained with {flag} {saved[key]!r}, and its '
                                 f'optimizer state keeps it; the command line asks {flag} {getattr(args, key)!r}. '
                                 'Drop it, or pass --no-resume-opt to start a fresh optimizer with it')
            changed.append(f'{key} {saved[key]!r} -> {getattr(args, key)!r}')
    if changed and int(os.environ.get('RANK', 0)) == 0:  # before the process group: the launcher's rank
        _logger.info(f'Resuming with changed settings: {", ".join(changed)}')


def check_args(args) -> None:
    """Everything that can be wrong with the request, before any work is done."""
    if not timm.is_model(args.model):
        close = timm.list_models(f'*{args.model.split("_")[0]}*')[:10]
        raise ValueError(f'unknown model {args.model!r}' + (f'; similar names: {close}' if close else ''))
    if args.dataset not in DATASETS:
        raise ValueError(f'unknown dataset {args.dataset!r}; expected one of {list(DATASETS)}')
    if args.fresh_train_data and args.dataset not in FRESH_EACH_EPOCH:
        raise ValueError(f'--fresh-train-data: a new training set each epoch is drawn for {list(FRESH_EACH_EPOCH)} '
                         f'only, not for --dataset {args.dataset!r}')
    if args.grad_accum_steps < 1:
        raise ValueError(f'--grad-accum-steps must be >= 1, got {args.grad_accum_steps}')
    if args.epochs < 1:
        raise ValueError(f'--epochs must be >= 1, got {args.epochs}')
    if args.batch_size < 1:
        raise ValueError(f'-b/--batch-size must be >= 1, got {args.batch_size}')
    if args.dist_timeout is not None and not args.dist_timeout > 0:
        raise ValueError(f'--dist-timeout must be a number of seconds > 0, got {args.dist_timeout}')
    for name in ('resume', 'initial_checkpoint'):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f'--{name.replace("_", "-")} {path!r} does not exist')


def checkpoint_files(folder: str) -> list:
    """The complete checkpoints in a run folder (not a tmp.pth.tar that a killed save left)."""
    return sorted(f for f in os.listdir(folder) if CHECKPOINT_FILE.match(f)) if os.path.isdir(folder) else []


def latest_epoch(folder: str) -> int:
    """The epoch of the newest checkpoint in a run folder: last.pth.tar's or the highest checkpoint-N."""
    epochs = [int(m.group(1)) for f in checkpoint_files(folder) if (m := re.match(r'checkpoint-(\d+)\.', f))]
    last = os.path.join(folder, 'last.pth.tar')
    if os.path.isfile(last):
        try:  # only its 'epoch' entry: memory-mapped, the tensors are not read
            with torch.serialization.safe_globals([argparse.Namespace]):
                epochs.append(int(torch.load(last, map_location='cpu', weights_only=True, mmap=True)['epoch']))
        except Exception:  # unreadable: the numbered checkpoints still say how far the run got
            pass
    return max(epochs, default=-1)


def resolve_output_dir(args, resume_state=None) -> str:
    """The run folder. A folder with checkpoints is only reused to resume its newest one.

    Another run, or a resume of an older checkpoint, would rewrite its checkpoints: that is refused.
    A folder without a complete checkpoint (the first save was killed) holds nothing to resume, so
    the run starts (again) there.
    """
    if args.resume and not args.experiment:
        out = os.path.dirname(os.path.abspath(args.resume))
    else:
        name = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), args.dataset.replace('/', '_')])
        out = os.path.join(args.output, name)
    existing = checkpoint_files(out)
    if not existing:
        return out
    resuming_here = args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(out)
    if not resuming_here:
        raise FileExistsError(f'{out!r} already holds checkpoints; choose another --experiment, or --resume from '
                              'one of them')
    epoch, newest = resume_state.get('epoch', -1), latest_epoch(out)
    if epoch < newest:
        raise FileExistsError(f'--resume {args.resume!r} is epoch {epoch}, but {out!r} holds checkpoints up to epoch '
                              f'{newest}: resuming it there would overwrite them; continue it in a new folder with '
                              '--experiment NAME')
    return out


def trim_summary(path: str, start_epoch: int) -> None:
    """Drop the summary rows of epochs from ``start_epoch`` on: no checkpoint holds their work (a run
    killed between its summary row and its checkpoint), and the run is about to redo them."""
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    keep = [row for row in rows if int(row['epoch']) < start_epoch]
    if len(keep) == len(rows):
        return
    _logger.warning(f'{path}: dropping the rows of epochs {[r["epoch"] for r in rows if r not in keep]}, which no '
                    'checkpoint holds (an interrupted run); they are trained again')
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        if keep:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(keep)
    os.replace(tmp, path)


def write_args(args, output_dir: str) -> None:
    """args.yaml of the run, written atomically."""
    path = os.path.join(output_dir, 'args.yaml')
    with open(path + '.tmp', 'w') as f:
        yaml.safe_dump({k: v for k, v in vars(args).items() if k != 'device'}, f)
    os.replace(path + '.tmp', path)


def init_distributed(args) -> torch.device:
    """timm's init_distributed_device, with --dist-timeout given to the process group.

    timm's helper takes no timeout, so under torchrun (or SLURM) this does what it does (env://
    rendezvous, nccl on CUDA and gloo otherwise, one device per local rank) with the timeout.
    """
    if not is_distributed_env():
        return init_distributed_device(args)
    local_rank, rank, world_size = world_info_from_env()
    os.environ.update(LOCAL_RANK=str(local_rank), RANK=str(rank), WORLD_SIZE=str(world_size))  # SLURM's too
    device_type = str(args.device).split(':')[0]
    backend = args.dist_backend or ('nccl' if device_type == 'cuda' else 'gloo')
    timeout = timedelta(seconds=args.dist_timeout) if args.dist_timeout else None
    torch.distributed.init_process_group(backend=backend, init_method='env://', timeout=timeout)
    args.distributed, args.world_size = True, torch.distributed.get_world_size()
    args.rank, args.local_rank = torch.distributed.get_rank(), local_rank
    if device_type != 'cpu':
        args.device = f'{device_type}:{local_rank}'
        if device_type == 'cuda':
            torch.cuda.set_device(args.device)
    return torch.device(args.device)


def create_task_model(args, device):
    kwargs = model_build_kwargs(vars(args))
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    if args.drop:
        kwargs['drop_rate'] = args.drop
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    if args.initial_checkpoint:
        checkpoint = load_training_checkpoint(args.initial_checkpoint)
        state_dict = model_state_dict(checkpoint)
        check_state_dict(state_dict, model, f'--initial-checkpoint {args.initial_checkpoint!r}')
        check_checkpoint_arch(checkpoint, model, f'--initial-checkpoint {args.initial_checkpoint!r}')
        model.load_state_dict(state_dict)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.to(device)


def build_loaders(args, model, device):
    data_config = resolve_data_config(vars(args), model=model, verbose=is_primary(args))
    common = dict(root=args.data_dir, download=args.dataset_download, seed=args.seed,
                  questions=args.sort_of_clevr_questions, progress=is_primary(args), train_split=args.train_split)
    # generate (and cache) once, on the first rank, before the others read the cache
    if args.distributed and not is_primary(args):
        torch.distributed.barrier()
    train_set = create_ait_dataset(args.dataset, split=args.train_split, num_samples=args.train_num_samples,
                                   fresh_each_epoch=args.fresh_train_data, **common)
    val_set = create_ait_dataset(args.dataset, split=args.val_split, num_samples=args.val_num_samples,
                                 **{**common, 'questions': 'all'})
    if args.distributed and is_primary(args):
        torch.distributed.barrier()
    check_num_classes(model, train_set, args.dataset)

    two_inputs = args.dataset == 'sort-of-clevr'
    use_prefetcher = device.type == 'cuda' and not two_inputs
    mixup_fn = collate_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        if two_inputs:
            raise ValueError('mixup/cutmix do not apply to question answering (sort-of-clevr)')
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                          switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=model.num_classes)
        if use_prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    no_aug = args.no_aug or dataset_needs_no_aug(args.dataset)
    loader_args = dict(
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
        distributed=args.distributed, pin_memory=args.pin_mem, device=device, use_prefetcher=use_prefetcher,
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
        persistent_workers=False)
    train_loader = create_loader(
        train_set, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=no_aug, re_prob=args.reprob, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, collate_fn=collate_fn, **loader_args)
    if len(train_loader) == 0:  # the training loader drops the last partial batch
        per_process = (len(train_set) + args.world_size - 1) // args.world_size
        raise ValueError(f'the training set has {len(train_set)} samples ({per_process} per process), fewer than '
                         f'one batch (-b {args.batch_size}): an epoch would have no step; pass -b {per_process} '
                         'or less, or a larger training set')
    # every rank evaluates the whole set, so no padding or reduction is needed and all agree
    val_loader = create_loader(
        val_set, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, **{**loader_args, 'distributed': False})
    relational = getattr(val_set, 'is_relational', None)
    return train_loader, val_loader, mixup_fn, relational


def train_one_epoch(epoch, task, loader, optimizer, scheduler, args, device, autocast, loss_scaler,
                    model_ema, mixup_fn):
    task.train()
    model = task.trainable_module
    accum = args.grad_accum_steps
    num_batches = len(loader)
    updates_per_epoch = (num_batches + accum - 1) // accum
    num_updates = epoch * updates_per_epoch
    meters = {k: AverageMeter() for k in ('loss', 'task_loss', 'balance_loss', 'aux_loss')}
    batch_time = AverageMeter()
    end = time.time()
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last = batch_idx == num_batches - 1
        need_update = last or (batch_idx + 1) % accum == 0
        input, target = to_device(input, device), target.to(device)
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
        sync = need_update or not args.distributed
        with (task.no_sync() if not sync else torch.enable_grad()):
            with autocast():
                result = task(input, target)
            # before the step: a non-finite loss must not reach the weights. Averaged over ranks, so
            # every rank sees the NaN of any and all stop together
            values = torch.stack([result[k].detach().float() for k in meters])
            if args.distributed:
                values = reduce_tensor(values, args.world_size)
            values = dict(zip(meters, values.tolist()))  # one device sync a step, not one a value
            if not math.isfinite(values['loss']):
                raise NonFiniteLossError(
                    f'the training loss is {values["loss"]} at epoch {epoch}, batch {batch_idx + 1}/{num_batches} '
                    f'(task loss {values["task_loss"]}, balance loss {values["balance_loss"]}): training diverged '
                    '(a learning rate too high? non-finite input?); stopping with the checkpoints of the last '
                    'finished epoch as they were')
            loss = result['loss'] / accum
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=model.parameters(), need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        if need_update:
            optimizer.zero_grad()
            num_updates += 1
            if args.sched_on_updates:
                scheduler.step_update(num_updates=num_updates)
            if model_ema is not None:
                model_ema.update(model, step=num_updates)

        n = target.shape[0]
        for k, meter in meters.items():
            meter.update(values[k], n)
        batch_time.update(time.time() - end)
        end = time.time()
        if is_primary(args) and (batch_idx % args.log_interval == 0 or last):
            lr = optimizer.param_groups[0]['lr']
            _logger.info(
                f'Train: {epoch} [{batch_idx + 1:>4d}/{num_batches}] '
                f'loss {meters["loss"].val:.4f} ({meters["loss"].avg:.4f})  '
                f'balance {meters["balance_loss"].val:.4f}  aux {meters["aux_loss"].val:.4g}  lr {lr:.3e}  '
                f'{n * args.world_size / batch_time.val:.1f} img/s')
    return OrderedDict((k, m.avg) for k, m in meters.items())


def check_finite(model, what: str) -> None:
    """A NonFiniteLossError if any weight or buffer of ``model`` is NaN or inf (nothing is saved then)."""
    broken = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise NonFiniteLossError(f'{what} hold non-finite values ({", ".join(broken[:3])}'
                                 f'{", ..." if len(broken) > 3 else ""}): training diverged; stopping with the '
                                 'checkpoints of the last finished epoch as they were')


def main(argv=None):
    setup_default_logging()
    args = parse_args(argv)
    check_args(args)
    resume_state = None
    if args.resume:  # the run's own settings, before anything is built from them
        resume_state = load_training_checkpoint(args.resume)
        if 'optimizer' not in resume_state and not args.no_resume_opt:
            raise ValueError(f'--resume {args.resume!r} holds no optimizer state (not a training checkpoint?); '
                             'start from its weights with --initial-checkpoint, or pass --no-resume-opt')
        apply_checkpoint_settings(args, given_args(argv), resume_state)
        check_args(args)
        if resume_state.get('epoch', -1) + 1 >= args.epochs:
            raise ValueError(f'--resume {args.resume!r} has finished epoch {resume_state.get("epoch")} of '
                             f'--epochs {args.epochs}: nothing is left to train; pass a larger --epochs to go on')
    device = init_distributed(args)
    output_dir = resolve_output_dir(args, resume_state)
    if args.distributed:
        _logger.info(f'Process {args.rank} of {args.world_size} on {device} (pid {os.getpid()}).')
    random_seed(args.seed, 0)  # the same initial weights and memory on every rank
    model = create_task_model(args, device)
    random_seed(args.seed, args.rank)
    if resume_state is not None:  # fail on a mismatched resume file before any work is done
        check_state_dict(model_state_dict(resume_state), model, f'--resume {args.resume!r}')
        check_checkpoint_arch(resume_state, model, f'--resume {args.resume!r}')
    if is_primary(args):
        _logger.info(f'Model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters')
    train_loader, val_loader, mixup_fn, relational = build_loaders(args, model, device)

    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    autocast = amp_context(args.amp, args.amp_dtype, device)
    loss_scaler = NativeScaler(device=device.type) if args.amp and args.amp_dtype == 'float16' else None
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None

    start_epoch = 0
    if resume_state is not None:
        model.load_state_dict(model_state_dict(resume_state))
        if not args.no_resume_opt:
            optimizer.load_state_dict(resume_state['optimizer'])
            if loss_scaler is not None and loss_scaler.state_dict_key in resume_state:
                loss_scaler.load_state_dict(resume_state[loss_scaler.state_dict_key])
        if model_ema is not None and 'state_dict_ema' in resume_state:
            model_ema.module.load_state_dict(model_state_dict(resume_state, use_ema=True))
        start_epoch = resume_state.get('epoch', -1) + 1

    if args.torchcompile:
        train_model = torch.compile(model, backend=args.torchcompile)
    else:
        train_model = model
    criterion_kwargs = dict(smoothing=args.smoothing, soft_targets=mixup_fn is not None or args.mixup > 0 or args.cutmix > 0)
    task = AiTClassificationTask(train_model, criterion_kwargs=criterion_kwargs,
                                 balance_loss_coef=args.balance_loss_coef, device=device, verbose=False)
    if args.distributed:
        # every rank writes the same memory (averaged writes), so buffers need no broadcast
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None,
                                 broadcast_buffers=False)

    updates_per_epoch = (len(train_loader) + args.grad_accum_steps - 1) // args.grad_accum_steps
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args, decreasing_metric=False),
                                                updates_per_epoch=updates_per_epoch)
    if start_epoch > 0:
        scheduler.step(start_epoch) if not args.sched_on_updates else scheduler.step_update(start_epoch * updates_per_epoch)
    reset_memory = args.reset_memory_each_epoch or getattr(model, 'memory_reset_each_epoch', False)

    saver = None
    if is_primary(args):
        os.makedirs(output_dir, exist_ok=True)
        write_args(args, output_dir)
        trim_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)
        saver = DigestCheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=model_ema,
                                      amp_scaler=loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
                                      decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist)
        if resume_state is not None and 'saver' in resume_state and os.path.dirname(
                os.path.abspath(args.resume)) == os.path.abspath(output_dir):
            saver.load_state_dict(resume_state['saver'])
        _logger.info(f'Training {args.model} on {args.dataset} for {num_epochs} epochs, writing to {output_dir}')

    eval_metrics = {}
    skipped_writes = 0
    for epoch in range(start_epoch, num_epochs):
        random_seed(args.seed + epoch, args.rank)  # the epoch's randomness depends only on (seed, epoch, rank)
        if hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        if reset_memory:
            timm_ait.reset_memory(model)
        started = time.perf_counter()
        if args.fresh_train_data:  # drawing the epoch's set is part of its training time
            train_loader.dataset.set_epoch(epoch)
        train_metrics = train_one_epoch(epoch, task, train_loader, optimizer, scheduler, args, device, autocast,
                                        loss_scaler, model_ema, mixup_fn)
        # summary.csv's train_time_s: seconds this epoch spent training (loading included, evaluation not),
        # so that a run resumed in parts still sums to its training time
        train_metrics['time_s'] = time.perf_counter() - started
        slot_similarity = timm_ait.memory_slot_similarity(model)
        if slot_similarity is not None:
            # how far the EWMA write has pulled the priors together (1: every slot the same)
            train_metrics['memory_slot_cos'] = slot_similarity
        check_finite(model, f'the weights after epoch {epoch}')
        if model_ema is not None:
            check_finite(model_ema.module, f'the EMA weights after epoch {epoch}')
        if not skipped_writes and timm_ait.skipped_memory_writes(model):  # said once; the count goes on
            skipped_writes = timm_ait.skipped_memory_writes(model)
            if is_primary(args):
                _logger.warning(f'epoch {epoch}: {skipped_writes} memory write(s) held NaN or inf and were skipped '
                                '(the memory keeps its last finite value); timm_ait.skipped_memory_writes(model) '
                                'counts them')
        eval_metrics = evaluate(model, val_loader, device, autocast, relational)
        if model_ema is not None:
            for k, v in evaluate(model_ema.module, val_loader, device, autocast, relational).items():
                eval_metrics[f'ema_{k}'] = v
        if not args.sched_on_updates:
            scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
        if is_primary(args):
            if slot_similarity is not None:
                _logger.info(f'Memory: mean cosine between slots {slot_similarity:.4f}')
            _logger.info('Eval: ' + '  '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items()))
            update_summary(epoch, train_metrics, eval_metrics, os.path.join(output_dir, 'summary.csv'),
                           lr=optimizer.param_groups[0]['lr'])
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric])
            _logger.info(f'Best {args.eval_metric} so far: {best_metric:.4f} (epoch {best_epoch})')
    if args.distributed:
        # the averaged memory writes and DDP's gradient averaging must leave every rank identical
        digests = [None] * args.world_size
        torch.distributed.all_gather_object(digests, state_digest(model))
        if len(set(digests)) != 1:
            raise RuntimeError(f'ranks ended with different weights or memory: {digests}')
        if is_primary(args):
            _logger.info(f'All {args.world_size} ranks end with the same weights and memory (sha256 {digests[0]})')
        torch.distributed.destroy_process_group()
    return eval_metrics


def stuck_rank_message(error: RuntimeError):
    """What to say when a collective failed because another rank is stuck or died (gloo's and nccl's own
    errors say little), or None when ``error`` is something else."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    text = str(error)
    if not re.search(r'[Tt]imed out|[Tt]imeout|pair closure|Connection (reset|closed)|[Bb]roken pipe', text):
        return None
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return (f'rank {rank} of {world}: another rank did not answer within the process group timeout '
            f'(--dist-timeout): it is stuck or died; stopping the run ({text.strip().splitlines()[0][:200]})')


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:  # bad requests; OSError: missing or existing files, a failed download
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:
        stuck = stuck_rank_message(e)
        if stuck is None:
            raise
        sys.stdout.flush()
        print(f'error: {stuck}', file=sys.stderr, flush=True)
        os._exit(1)  # not sys.exit: the process group's teardown would wait for the stuck rank
