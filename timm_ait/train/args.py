"""The training script's arguments: timm's flag names, a YAML config of defaults, and the rules of a resume."""
import argparse
import logging
import os

import torch
import yaml

import timm
from timm.utils import ParseKwargs

from ..data.factory import DATASETS, FRESH_EACH_EPOCH, QUESTION_ANSWERING, SPLITS, resolve_split
from ..run_model import MODEL_SETTINGS, resolve_model_settings, run_args
from .evaluate import metric_names

__all__ = ['PER_INVOCATION', 'OPTIMIZER_SETTINGS', 'CLIP_MODES', 'build_parser', 'parse_args', 'given_args',
           'apply_checkpoint_settings', 'eval_metrics', 'check_args']

_logger = logging.getLogger('train')

# flags that say how this invocation runs, not what the run computes: a resume never takes them from
# the checkpoint, and they may differ from it
PER_INVOCATION = ('config', 'resume', 'no_resume_opt', 'initial_checkpoint', 'pretrained', 'experiment', 'output',
                  'device', 'dist_backend', 'dist_timeout', 'workers', 'pin_mem', 'log_interval', 'dataset_download',
                  'torchcompile', 'profile')
# what a resumed optimizer state fixes (timm's schedule starts from the state's initial_lr)
OPTIMIZER_SETTINGS = ('opt', 'lr', 'weight_decay', 'momentum', 'opt_eps', 'opt_betas')
# timm's dispatch_clip_grad modes
CLIP_MODES = ('norm', 'value', 'agc')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='timm-ait training', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of defaults (flag names as keys)')
    group = parser.add_argument_group('Dataset')
    group.add_argument('--dataset', '-d', default='triangle', metavar='NAME', help=f'one of {list(DATASETS)}')
    group.add_argument('--data-dir', default=None, metavar='DIR', help='dataset root (cache folder for generated data)')
    group.add_argument('--train-split', default='train',
                       help=f"one of {list(SPLITS)}, or an image folder's subfolder")
    group.add_argument('--val-split', default='validation',
                       help=f"one of {list(SPLITS)}, or an image folder's subfolder")
    group.add_argument('--dataset-download', action='store_true', help='let torchvision download the dataset')
    group.add_argument('--train-num-samples', type=int, default=None,
                       help='size of the training set (generated), or a random subset of N drawn from --seed')
    group.add_argument('--fresh-train-data', action='store_true',
                       help='a new generated training set each epoch, drawn from (--seed, epoch) (triangle; the '
                            "authors' Triangle draws a new image at every access); epoch 0 is the cached set")
    group.add_argument('--val-num-samples', type=int, default=None,
                       help='size of the validation set (generated), or a random subset of N drawn from --seed')
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
    group.add_argument('--clip-mode', default='norm', choices=CLIP_MODES)
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
    group.add_argument('--profile', default=None, metavar='FILE',
                       help='profile the first epoch this process trains with torch.profiler and write where its time '
                            'went, by operator and by module (forward and backward), to FILE as JSON; that epoch runs '
                            'slower (its train_time_s too)')
    group.add_argument('--eval-metric', default='top1',
                       help='the metric that ranks checkpoints (and drives a plateau schedule): loss, top1, top5, '
                            'ema_* with --model-ema, (non_)relational_top1 for question answering')
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
        actions = {a.dest: a for a in parser._actions}
        unknown = sorted(set(cfg) - set(actions))
        if unknown:
            parser.error(f'config {known.config!r} has unknown keys {unknown}; keys are flag names with underscores')
        for key, value in cfg.items():
            try:
                cfg[key] = _config_value(actions[key], value)
            except ValueError as e:
                parser.error(f'config {known.config!r}: {key}: expected {e}, got {value!r} ({type(value).__name__}'
                             + ('; YAML reads yes/no/on/off/true/false as booleans' if isinstance(value, bool) else '')
                             + ')')
    return known.config, cfg, remaining


_TYPE_NAMES = {int: 'an integer', float: 'a number', None: 'a string'}
_LIST_NAMES = {int: 'integers', float: 'numbers', None: 'strings'}


def _scalar(action: argparse.Action, value):
    """``value`` as the flag's type would make it from the command line, or a ValueError saying what it
    expects. YAML has its own types: a bool is no integer (``epochs: yes`` is True), a string is
    converted as argparse converts it (``lr: 1e-3`` is a string to YAML)."""
    kind = action.type
    what = _TYPE_NAMES.get(kind, getattr(kind, '__name__', str(kind)))
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise ValueError(what)
    if kind is None:
        if not isinstance(value, str):
            raise ValueError(what)
    elif kind is int:
        if isinstance(value, float) or not isinstance(value, (int, str)):
            raise ValueError(what)
        value = int(value) if not isinstance(value, str) else _convert(kind, value, what)
    elif kind is float:
        if not isinstance(value, (int, float, str)):
            raise ValueError(what)
        value = float(value) if not isinstance(value, str) else _convert(kind, value, what)
    elif isinstance(value, str):
        value = _convert(kind, value, what)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f'one of {list(action.choices)}')
    return value


def _convert(kind, text: str, what: str):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ValueError(what) from None


def _config_value(action: argparse.Action, value):
    """A config value checked against its flag (type, number of values, choices): what the command line
    would give, else a ValueError naming what was expected."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError('true or false')
        return value
    if isinstance(action, ParseKwargs):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError('a mapping of model keyword names to values')
        return value
    if value is None and action.default is None:  # 'not set', as the flag's default
        return None
    if action.nargs in ('+', '*'):
        what = (f'a list of {_LIST_NAMES.get(action.type, "values")}'
                + (' (at least one)' if action.nargs == '+' else ''))
        if not isinstance(value, list) or (action.nargs == '+' and not value):
            raise ValueError(what)
        try:
            return [_scalar(action, v) for v in value]
        except ValueError:
            raise ValueError(what) from None
    return _scalar(action, value)


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
    saved = run_args(checkpoint)
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


def eval_metrics(args) -> list:
    """The names of the metrics each epoch's evaluation reports (eval_* in summary.csv), as --eval-metric
    may name them."""
    names = metric_names(relational=args.dataset in QUESTION_ANSWERING)
    return names + ([f'ema_{name}' for name in names] if args.model_ema else [])


def check_args(args) -> None:
    """Everything that can be wrong with the request, before any work is done."""
    if not timm.is_model(args.model):
        close = timm.list_models(f'*{args.model.split("_")[0]}*')[:10]
        raise ValueError(f'unknown model {args.model!r}' + (f'; similar names: {close}' if close else ''))
    dropped = sorted(k for k, v in (args.model_kwargs or {}).items() if v is None)
    if dropped:
        raise ValueError(f'--model-kwargs {" ".join(f"{k}=None" for k in dropped)}: timm.create_model drops None '
                         'arguments, so the model would be built with its default while the run records None; give '
                         'a value (the dense ablation is bottleneck=none)')
    if args.dataset not in DATASETS:
        raise ValueError(f'unknown dataset {args.dataset!r}; expected one of {list(DATASETS)}')
    for key in ('train_split', 'val_split'):  # a misspelt split must not fall back to another one
        try:
            resolve_split(args.dataset, getattr(args, key), args.data_dir)
        except (ValueError, OSError) as e:
            raise type(e)(f'--{key.replace("_", "-")} {getattr(args, key)!r}: {e}') from None
    if args.fresh_train_data and args.dataset not in FRESH_EACH_EPOCH:
        raise ValueError(f'--fresh-train-data: a new training set each epoch is drawn for {list(FRESH_EACH_EPOCH)} '
                         f'only, not for --dataset {args.dataset!r}')
    if args.grad_accum_steps < 1:
        raise ValueError(f'--grad-accum-steps must be >= 1, got {args.grad_accum_steps}')
    if args.epochs < 1:
        raise ValueError(f'--epochs must be >= 1, got {args.epochs}')
    if args.batch_size < 1:
        raise ValueError(f'-b/--batch-size must be >= 1, got {args.batch_size}')
    for key in ('log_interval', 'checkpoint_hist'):
        if getattr(args, key) < 1:
            raise ValueError(f'--{key.replace("_", "-")} must be >= 1, got {getattr(args, key)}')
    if args.clip_mode not in CLIP_MODES:
        raise ValueError(f'--clip-mode must be one of {list(CLIP_MODES)}, got {args.clip_mode!r}')
    metrics = eval_metrics(args)
    if args.eval_metric not in metrics:
        raise ValueError(f'--eval-metric {args.eval_metric!r} is not a metric of this run; expected one of {metrics}')
    if args.dist_timeout is not None and not args.dist_timeout > 0:
        raise ValueError(f'--dist-timeout must be a number of seconds > 0, got {args.dist_timeout}')
    if args.profile is not None:
        if args.torchcompile:
            raise ValueError('--profile charges time to modules through hooks on their eager forward; it does not '
                             'combine with --torchcompile')
        folder = os.path.dirname(os.path.abspath(args.profile))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'--profile {args.profile!r}: the folder {folder!r} does not exist')
        if os.path.isdir(args.profile):
            raise ValueError(f'--profile {args.profile!r} is a folder; expected the path of the JSON file to write')
    for name in ('resume', 'initial_checkpoint'):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f'--{name.replace("_", "-")} {path!r} does not exist')
