#!/usr/bin/env python3
""" Train AiT, or any timm model, on one CPU or many GPUs with timm's machinery and flag names.

    python train_scripts/train.py --model ait_small_patch32_64 --dataset triangle --epochs 2
    torchrun --nproc_per_node=8 train_scripts/train.py -c train_scripts/configs/ait_small_patch4_32-cifar10.yaml \
        --data-dir /data/cifar --dataset-download

The loss is cross-entropy plus ``--balance-loss-coef`` times the bottleneck attention balance loss
(timm_ait.task.AiTClassificationTask). Each epoch's metrics, the balance loss among them, go to
summary.csv in the output folder beside timm's columns; checkpoints are written by timm's
CheckpointSaver (atomically: a file is complete or absent). Every random draw of an epoch (data
order, augmentation, dropout) is seeded by (--seed, epoch, rank), so a resumed run continues as the
uninterrupted one would.
"""
import argparse
import logging
import os
import sys
import time
from collections import OrderedDict
from datetime import datetime

import torch
import yaml

import timm
from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    AverageMeter, CheckpointSaver, ModelEmaV3, NativeScaler, ParseKwargs, dispatch_clip_grad,
    init_distributed_device, is_primary, random_seed, reduce_tensor, setup_default_logging, update_summary,
)

import timm_ait
from timm_ait.data.factory import DATASETS, check_num_classes, create_ait_dataset, dataset_needs_no_aug
from timm_ait.engine import (
    amp_context, check_state_dict, evaluate, load_training_checkpoint, model_state_dict, state_digest, to_device,
)
from timm_ait.task import DEFAULT_BALANCE_LOSS_COEF, AiTClassificationTask

_logger = logging.getLogger('train')


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
    group.add_argument('--output', default='./output/train', metavar='DIR')
    group.add_argument('--experiment', default='', help='name of the run folder under --output')
    group.add_argument('--eval-metric', default='top1')
    return parser


def parse_args(argv=None):
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    known, remaining = config_parser.parse_known_args(argv)
    if known.config:
        if not os.path.isfile(known.config):
            parser.error(f'config file {known.config!r} does not exist')
        with open(known.config) as f:
            cfg = yaml.safe_load(f) or {}
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - dests)
        if unknown:
            parser.error(f'config {known.config!r} has unknown keys {unknown}; keys are flag names with underscores')
        parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = known.config
    return args


def check_args(args) -> None:
    """Everything that can be wrong with the request, before any work is done."""
    if not timm.is_model(args.model):
        close = timm.list_models(f'*{args.model.split("_")[0]}*')[:10]
        raise ValueError(f'unknown model {args.model!r}' + (f'; similar names: {close}' if close else ''))
    if args.dataset not in DATASETS:
        raise ValueError(f'unknown dataset {args.dataset!r}; expected one of {list(DATASETS)}')
    if args.grad_accum_steps < 1:
        raise ValueError(f'--grad-accum-steps must be >= 1, got {args.grad_accum_steps}')
    for name in ('resume', 'initial_checkpoint'):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f'--{name.replace("_", "-")} {path!r} does not exist')


def resolve_output_dir(args) -> str:
    """The run folder. An existing folder with checkpoints is only reused to resume from it."""
    if args.resume and not args.experiment:
        return os.path.dirname(os.path.abspath(args.resume))
    name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), args.dataset.replace('/', '_')])
    out = os.path.join(args.output, name)
    resuming_here = args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(out)
    if os.path.isdir(out) and not resuming_here and any(f.endswith('.pth.tar') for f in os.listdir(out)):
        raise FileExistsError(f'{out!r} already holds checkpoints; choose another --experiment, or --resume from '
                              'one of them')
    return out


def create_task_model(args, device):
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    if args.drop:
        kwargs['drop_rate'] = args.drop
    if args.img_size is not None and timm.get_pretrained_cfg(args.model).fixed_input_size:
        # a fixed-size model (the flatten head) is built for the size the data will have
        kwargs['img_size'] = args.img_size
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    if args.initial_checkpoint:
        state_dict = model_state_dict(load_training_checkpoint(args.initial_checkpoint))
        check_state_dict(state_dict, model, f'--initial-checkpoint {args.initial_checkpoint!r}')
        model.load_state_dict(state_dict)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.to(device)


def build_loaders(args, model, device):
    data_config = resolve_data_config(vars(args), model=model, verbose=is_primary(args))
    common = dict(root=args.data_dir, download=args.dataset_download, seed=args.seed,
                  questions=args.sort_of_clevr_questions, progress=is_primary(args))
    # generate (and cache) once, on the first rank, before the others read the cache
    if args.distributed and not is_primary(args):
        torch.distributed.barrier()
    train_set = create_ait_dataset(args.dataset, split=args.train_split, num_samples=args.train_num_samples, **common)
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
    meters = {k: AverageMeter() for k in ('loss', 'task_loss', 'balance_loss')}
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
            value = result[k].detach()
            if args.distributed:
                value = reduce_tensor(value, args.world_size)
            meter.update(value.item(), n)
        batch_time.update(time.time() - end)
        end = time.time()
        if is_primary(args) and (batch_idx % args.log_interval == 0 or last):
            lr = optimizer.param_groups[0]['lr']
            _logger.info(
                f'Train: {epoch} [{batch_idx + 1:>4d}/{num_batches}] '
                f'loss {meters["loss"].val:.4f} ({meters["loss"].avg:.4f})  '
                f'balance {meters["balance_loss"].val:.4f}  lr {lr:.3e}  '
                f'{n * args.world_size / batch_time.val:.1f} img/s')
    return OrderedDict((k, m.avg) for k, m in meters.items())


def main(argv=None):
    setup_default_logging()
    args = parse_args(argv)
    check_args(args)
    device = init_distributed_device(args)
    output_dir = resolve_output_dir(args)
    resume_state = load_training_checkpoint(args.resume) if args.resume else None
    if args.distributed:
        _logger.info(f'Process {args.rank} of {args.world_size} on {device}.')
    random_seed(args.seed, 0)  # the same initial weights and memory on every rank
    model = create_task_model(args, device)
    random_seed(args.seed, args.rank)
    if resume_state is not None:  # fail on a mismatched resume file before any work is done
        check_state_dict(model_state_dict(resume_state), model, f'--resume {args.resume!r}')
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
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump({k: v for k, v in vars(args).items() if k != 'device'}, f)
        saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=model_ema,
                                amp_scaler=loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
                                decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist)
        if resume_state is not None and 'saver' in resume_state and os.path.dirname(
                os.path.abspath(args.resume)) == os.path.abspath(output_dir):
            saver.load_state_dict(resume_state['saver'])
        _logger.info(f'Training {args.model} on {args.dataset} for {num_epochs} epochs, writing to {output_dir}')

    eval_metrics = {}
    for epoch in range(start_epoch, num_epochs):
        random_seed(args.seed + epoch, args.rank)  # the epoch's randomness depends only on (seed, epoch, rank)
        if hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        if reset_memory:
            timm_ait.reset_memory(model)
        started = time.perf_counter()
        train_metrics = train_one_epoch(epoch, task, train_loader, optimizer, scheduler, args, device, autocast,
                                        loss_scaler, model_ema, mixup_fn)
        # summary.csv's train_time_s: seconds this epoch spent training (loading included, evaluation not),
        # so that a run resumed in parts still sums to its training time
        train_metrics['time_s'] = time.perf_counter() - started
        eval_metrics = evaluate(model, val_loader, device, autocast, relational)
        if model_ema is not None:
            for k, v in evaluate(model_ema.module, val_loader, device, autocast, relational).items():
                eval_metrics[f'ema_{k}'] = v
        if not args.sched_on_updates:
            scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
        if is_primary(args):
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


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
