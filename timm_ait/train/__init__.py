"""Training and validation as a package; train_scripts/train.py and validate.py are entry points to it.

One module a job: ``args`` (flags, YAML config, the rules of a resume), ``run_dir`` (the run folder,
its claim and summary.csv), ``distributed``, ``task`` (the loss), ``guard`` (non-finite updates skipped
on the device, losses summed there), ``evaluate``, ``loop`` (the epoch loop and ``main``), ``validate``
and ``demo``.
"""
from .args import build_parser, check_args, parse_args
from .evaluate import evaluate
from .loop import NonFiniteLossError, cli, create_task_model, main
from .task import DEFAULT_BALANCE_LOSS_COEF, AiTClassificationTask

__all__ = ['build_parser', 'check_args', 'parse_args', 'evaluate', 'NonFiniteLossError', 'cli', 'create_task_model',
           'main', 'DEFAULT_BALANCE_LOSS_COEF', 'AiTClassificationTask']
