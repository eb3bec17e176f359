"""Train AiT, or any timm model, on one CPU or many GPUs with timm's machinery and flag names.

    python train_scripts/train.py --model ait_small_patch32_64 --dataset triangle --epochs 2
    torchrun --nproc_per_node=8 train_scripts/train.py -c train_scripts/configs/ait_small_patch4_32-cifar10.yaml \
        --data-dir /data/cifar --dataset-download

The loss is cross-entropy (:class:`timm_ait.train.task.AiTClassificationTask`); an AiT adds its balance
term, ``balance_loss_coef`` (a model keyword, 1e-2 by default) times the bottleneck attention balance loss,
to the backward itself. Each epoch's metrics, the balance loss among them, go
to summary.csv in the run folder beside timm's columns, with the mean cosine between memory slots
(train_memory_slot_cos: 1 when the memory has collapsed to one prior) and, per layer, the memory's
participation rank and mean |cosine| between slots (train_memory_rank_blocks0, train_memory_abs_cos_blocks0,
...: a memory split into +v and -v has a mean cosine near 0 but rank 1 and |cos| 1); checkpoints are written by timm's
CheckpointSaver (atomically: a file is complete or absent), each with a digest of its contents that a
resume checks. Every random draw of an epoch (data order, augmentation, dropout) is seeded by
(--seed, epoch, rank), so a resumed run continues as the uninterrupted one would. A resume takes the
run's settings from its checkpoint; the command line may change how the run continues (--epochs,
the data folder, logging, ...) but not the model or the resumed optimizer's settings.

A training step does not wait for the device between log intervals: a step whose loss or gradients
are not finite has its update skipped on the device (timm_ait.train.guard), and the run stops at the
next log interval, leaving its checkpoints as they are. One process at a time writes into a run
folder (its run.lock). A distributed run stops when a rank does not answer for --dist-timeout seconds.
"""
import json
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext, suppress

import torch

from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    AverageMeter, ModelEmaV3, NativeScaler, dispatch_clip_grad, is_primary, random_seed, reduce_tensor,
    setup_default_logging,
)

from ..checkpoint import DigestCheckpointSaver, model_state_dict, read_checkpoint, state_digest
from ..data.factory import (
    QUESTION_ANSWERING, check_model_inputs, check_num_classes, create_ait_dataset, dataset_needs_no_aug, resolve_split,
)
from ..hub import PretrainedDownloadError
from ..layers import (
    GlobalWorkspaceLayer, mean_abs_slot_cosine, memory_by_layer, memory_participation_rank, memory_slot_similarity,
    reset_memory as reset_model_memory, set_balance_loss_scale, skipped_memory_writes,
)
from ..run_model import MODEL_SETTINGS, load_run_model, run_args
from ..time_breakdown import module_ranges, time_breakdown
from .args import apply_checkpoint_settings, check_args, given_args, parse_args
from .distributed import init_distributed, stuck_rank_message
from .evaluate import amp_context, evaluate, to_device
from .guard import FiniteUpdates, StepMeters
from .run_dir import RunDirClaim, check_output_dir, resolve_output_dir, trim_summary, write_args, write_summary_row
from .task import AiTClassificationTask

__all__ = ['NonFiniteLossError', 'main', 'cli']

_logger = logging.getLogger('train')


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss (or weights): the run stops, its checkpoints untouched."""


def create_task_model(args, device, checkpoint=None, given=frozenset()):
    """The model to train, built through the one loader: from ``checkpoint`` (a resume's, or
    --initial-checkpoint's) with the settings it was trained with, else from the command line.

    ``args`` takes the settings the model was built with, so args.yaml and the checkpoints record them.
    """
    create_kwargs = {}
    if args.drop_path is not None:
        create_kwargs['drop_path_rate'] = args.drop_path
    if args.drop:
        create_kwargs['drop_rate'] = args.drop
    what = f'--resume {args.resume!r}' if args.resume else f'--initial-checkpoint {args.initial_checkpoint!r}'
    if checkpoint is None and args.initial_checkpoint:
        checkpoint = read_checkpoint(args.initial_checkpoint)
    if checkpoint is not None and run_args(checkpoint):  # the run's settings; the command line may only repeat them
        requested = {k: getattr(args, k) for k in MODEL_SETTINGS if k in given}
    else:
        requested = {k: getattr(args, k) for k in MODEL_SETTINGS}
    loaded = load_run_model(checkpoint or '', pretrained=args.pretrained, create_kwargs=create_kwargs, what=what,
                            **{k: v for k, v in requested.items()})
    for key, value in loaded.settings.items():
        setattr(args, key, value)
    model = loaded.model
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.to(device)


def build_loaders(args, model, device):
    data_config = resolve_data_config(vars(args), model=model, verbose=is_primary(args))
    common = dict(root=args.data_dir, download=args.dataset_download, seed=args.seed,
                  questions=args.sort_of_clevr_questions, progress=is_primary(args), train_split=args.train_split)
    same = resolve_split(args.dataset, args.train_split, args.data_dir) == resolve_split(
        args.dataset, args.val_split, args.data_dir)
    if same and is_primary(args):
        _logger.warning(f'--train-split {args.train_split!r} and --val-split {args.val_split!r} are the same split: '
                        'the eval_* figures of this run are measured on training data')
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

    two_inputs = args.dataset in QUESTION_ANSWERING
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


def _any_rank(flag: torch.Tensor) -> None:
    """``flag`` (a bool tensor) set on every rank where it is set on any (in place, on the device)."""
    as_int = flag.to(torch.int32)
    torch.distributed.all_reduce(as_int, op=torch.distributed.ReduceOp.MAX)
    flag.copy_(as_int > 0)


def _diverged(first: list, epoch: int, num_batches: int) -> NonFiniteLossError:
    batch, loss, task_loss, balance, _ = first
    where = f'at epoch {epoch}, batch {int(batch)}/{num_batches}'
    what = (f'the training loss is {loss} {where} (task loss {task_loss}, balance loss {balance})'
            if not math.isfinite(loss) else f'the gradients are not finite {where} (loss {loss})')
    return NonFiniteLossError(f'{what}: training diverged (a learning rate too high? non-finite input?); its update '
                              'was skipped, and the run stops with the checkpoints of the last finished epoch as they '
                              'were')


def train_one_epoch(epoch, task, loader, optimizer, scheduler, args, device, autocast, loss_scaler,
                    model_ema, mixup_fn):
    """One epoch of training steps that never wait for the device between log intervals.

    A step whose loss or gradients are not finite is skipped on the device (``FiniteUpdates``); the
    skips and the summed losses are read at the log interval and at the last step, one transfer each
    time, and the first skip stops the run there (a NonFiniteLossError), before anything is saved.
    """
    task.train()
    model = task.trainable_module
    accum = args.grad_accum_steps
    has_gwl = any(isinstance(m, GlobalWorkspaceLayer) for m in model.modules())
    if has_gwl:  # the balance term is scaled as this loss is: divided by accum (and by the fp16 scale, below)
        set_balance_loss_scale(model, 1.0 / accum)
    num_batches = len(loader)
    updates_per_epoch = (num_batches + accum - 1) // accum
    num_updates = epoch * updates_per_epoch
    meters = StepMeters(('loss', 'task_loss', 'balance_loss', 'aux_loss'), device)
    # a GradScaler skips its own overflowed gradients (those of a finite loss are no divergence)
    updates = FiniteUpdates(optimizer, device, check_grads=loss_scaler is None,
                            reduce=_any_rank if args.distributed else None)
    reduce = (lambda t: reduce_tensor(t, args.world_size)) if args.distributed else None
    batch_time = AverageMeter()
    end = time.time()
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last = batch_idx == num_batches - 1
        need_update = last or (batch_idx + 1) % accum == 0
        input, target = to_device(input, device), target.to(device)
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
        if has_gwl and loss_scaler is not None:  # the fp16 loss scale changes from step to step
            set_balance_loss_scale(model, loss_scaler._scaler.scale(torch.ones((), device=device)) / accum)
        sync = need_update or not args.distributed
        with (task.no_sync() if not sync else torch.enable_grad()):
            with autocast():
                result = task(input, target)
            values = torch.stack([result[k].detach().float() for k in meters.names])
            updates.observe(values, batch_idx)
            loss = result['loss'] / accum
            if loss_scaler is not None:
                if need_update:
                    updates.step(lambda: loss_scaler(loss, optimizer, clip_grad=args.clip_grad,
                                                     clip_mode=args.clip_mode, parameters=model.parameters(),
                                                     need_update=True), batch_idx, values)
                else:
                    loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                                parameters=model.parameters(), need_update=False)
            else:
                loss.backward()
                if need_update:
                    def step():
                        if args.clip_grad is not None:
                            dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
                        optimizer.step()
                    updates.step(step, batch_idx, values)
        if need_update:
            optimizer.zero_grad()
            num_updates += 1
            if args.sched_on_updates:
                scheduler.step_update(num_updates=num_updates)
            if model_ema is not None:
                model_ema.update(model, step=num_updates)

        n = target.shape[0]
        meters.update(values, n)
        batch_time.update(time.time() - end)
        end = time.time()
        if batch_idx % args.log_interval == 0 or last:  # every rank reads (and stops) at the same steps
            now, avg, (skipped, first) = meters.read(updates.skipped, updates.first, reduce=reduce)
            if skipped[0]:
                raise _diverged(first, epoch, num_batches)
            if is_primary(args):
                lr = optimizer.param_groups[0]['lr']
                _logger.info(
                    f'Train: {epoch} [{batch_idx + 1:>4d}/{num_batches}] '
                    f'loss {now["loss"]:.4f} ({avg["loss"]:.4f})  '
                    f'balance {now["balance_loss"]:.4f}  aux {now["aux_loss"]:.4g}  lr {lr:.3e}  '
                    f'{n * args.world_size / batch_time.val:.1f} img/s')
    return OrderedDict(avg)


@contextmanager
def profile_epoch(path: str, model, steps: int):
    """Profile what runs inside (an epoch) and write its :func:`time_breakdown` as JSON to ``path``: the
    host's time by operator and module (on a GPU, the time spent issuing kernels, not running them)."""
    started = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, module_ranges(model):
        yield
    seconds = time.perf_counter() - started
    breakdown = time_breakdown(prof.events())
    partial = f'{path}.partial'
    try:  # whole or absent, never a truncated profile
        with open(partial, 'w') as f:
            json.dump(dict(breakdown, steps=steps, wall_s=seconds, model=type(model).__name__), f, indent=1)
        os.replace(partial, path)
    except OSError as e:  # a profile is not worth the run: it goes on to evaluate and save the epoch
        with suppress(OSError):  # nothing to remove, or a disk that refuses even that: the run still goes on
            os.remove(partial)
        _logger.warning(f'--profile: could not write {path} ({e}); training goes on')
        return
    _logger.info(f'Profile of the epoch ({steps} steps, {seconds:.1f} s under the profiler) written to {path}')


def _layer_name(memory_name: str) -> str:
    """'blocks.0.mlp.memory' -> 'blocks0': a short, CSV-safe column suffix for a layer's memory."""
    return memory_name.replace('.mlp.memory', '').replace('.', '')


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
    given = given_args(argv)
    resume_state = None
    if args.resume:  # the run's own settings, before anything is built from them
        resume_state = read_checkpoint(args.resume)
        if 'optimizer' not in resume_state and not args.no_resume_opt:
            raise ValueError(f'--resume {args.resume!r} holds no optimizer state (not a training checkpoint?); '
                             'start from its weights with --initial-checkpoint, or pass --no-resume-opt')
        apply_checkpoint_settings(args, given, resume_state)
        check_args(args)
        if resume_state.get('epoch', -1) + 1 >= args.epochs:
            raise ValueError(f'--resume {args.resume!r} has finished epoch {resume_state.get("epoch")} of '
                             f'--epochs {args.epochs}: nothing is left to train; pass a larger --epochs to go on')
    device = init_distributed(args)
    output_dir, claim = claim_output_dir(args, resume_state)
    try:
        return _train(args, given, resume_state, device, output_dir)
    finally:
        if claim is not None:  # the folder too, if the run was refused before writing anything there
            claim.release(remove_empty=True)


def claim_output_dir(args, resume_state):
    """The run folder and the first rank's claim on it (see RunDirClaim); the other ranks learn the
    folder, or why it is refused, from the first."""
    claim = error = output_dir = None
    if is_primary(args):
        try:
            output_dir = resolve_output_dir(args, resume_state)
            claim = RunDirClaim(output_dir)
            check_output_dir(output_dir, args, resume_state)  # again, now that no other run can write there
        except OSError as e:
            if claim is not None:
                claim.release(remove_empty=True)
            error = e
    if args.distributed:
        shared = [output_dir, None if error is None else str(error)]
        torch.distributed.broadcast_object_list(shared, src=0)
        output_dir, message = shared
        if error is None and message is not None:
            error = FileExistsError(message)
    if error is not None:
        raise error
    return output_dir, claim


def _train(args, given, resume_state, device, output_dir):
    if args.distributed:
        _logger.info(f'Process {args.rank} of {args.world_size} on {device} (pid {os.getpid()}).')
    random_seed(args.seed, 0)  # the same initial weights and memory on every rank
    model = create_task_model(args, device, resume_state, given)  # a mismatched file fails here, before any work
    check_model_inputs(model, args.model, args.dataset)
    random_seed(args.seed, args.rank)
    if is_primary(args):
        _logger.info(f'Model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters')
    train_loader, val_loader, mixup_fn, relational = build_loaders(args, model, device)

    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    autocast = amp_context(args.amp, args.amp_dtype, device)
    loss_scaler = NativeScaler(device=device.type) if args.amp and args.amp_dtype == 'float16' else None
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None

    start_epoch = 0
    if resume_state is not None:
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
    task = AiTClassificationTask(train_model, criterion_kwargs=criterion_kwargs, device=device, verbose=False)
    if args.distributed:
        # every rank writes the same memory (averaged writes), so buffers need no broadcast
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None,
                                 broadcast_buffers=False)

    updates_per_epoch = (len(train_loader) + args.grad_accum_steps - 1) // args.grad_accum_steps
    decreasing = args.eval_metric.endswith('loss')  # a lower loss is better; accuracies rise
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing),
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
                                      decreasing=decreasing, max_history=args.checkpoint_hist)
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
            reset_model_memory(model)
        started = time.perf_counter()
        if args.fresh_train_data:  # drawing the epoch's set is part of its training time
            train_loader.dataset.set_epoch(epoch)
        with (profile_epoch(args.profile, model, len(train_loader))
              if args.profile and epoch == start_epoch and is_primary(args) else nullcontext()):
            train_metrics = train_one_epoch(epoch, task, train_loader, optimizer, scheduler, args, device, autocast,
                                            loss_scaler, model_ema, mixup_fn)
        # summary.csv's train_time_s: seconds this epoch spent training (loading included, evaluation not),
        # so that a run resumed in parts still sums to its training time
        train_metrics['time_s'] = time.perf_counter() - started
        slot_similarity = memory_slot_similarity(model)
        # per layer, measures a +-v split cannot fool: the memory's participation rank (1: collapsed to one
        # direction, S for S orthogonal slots of one length) and the mean |cosine| between its slots
        for measure, column in ((memory_participation_rank, 'memory_rank'), (mean_abs_slot_cosine, 'memory_abs_cos')):
            for name, value in memory_by_layer(model, measure).items():
                train_metrics[f'{column}_{_layer_name(name)}'] = value
        if slot_similarity is not None:
            # how far the EWMA write has pulled the priors together (1: every slot the same)
            train_metrics['memory_slot_cos'] = slot_similarity
        check_finite(model, f'the weights after epoch {epoch}')
        if model_ema is not None:
            check_finite(model_ema.module, f'the EMA weights after epoch {epoch}')
        if not skipped_writes and skipped_memory_writes(model):  # said once; the count goes on
            skipped_writes = skipped_memory_writes(model)
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
            # timm's update_summary columns, written so that a column added at a resume keeps the others
            write_summary_row(os.path.join(output_dir, 'summary.csv'), {
                'epoch': epoch, **{f'train_{k}': v for k, v in train_metrics.items()},
                **{f'eval_{k}': v for k, v in eval_metrics.items()}, 'lr': optimizer.param_groups[0]['lr']})
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


def cli(argv=None) -> None:
    """``main`` for the command line: a bad request or a divergence ends in one line and an exit code."""
    try:
        main(argv)
    except (ValueError, OSError, PretrainedDownloadError) as e:  # bad requests; missing files; a failed download
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
