"""Rebuilding a run's model from its checkpoint: the one loader of training checkpoints.

A training checkpoint carries the run's settings (``args``: model name, ``--model-kwargs``, classes,
image size, normalisation). The model is rebuilt with them, its weights (plain or EMA, as asked)
checked key by key and loaded, and the model's own check refuses settings that would compute another
function with the same weights. train.py (``--resume``, ``--initial-checkpoint``), validate.py,
push_to_hub.py and the analysis all load through :func:`load_run_model`.
"""
import argparse
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import timm
import torch
from torch import nn

from .checkpoint import check_state_dict, model_state_dict, read_checkpoint
from .models.ait import upgrade_model_kwargs
from .models.paramixer import AUTHORS_MODELS

__all__ = ['MODEL_SETTINGS', 'DATA_SETTINGS', 'LoadedRun', 'resolve_model_settings', 'model_build_kwargs',
           'check_checkpoint_arch', 'run_args', 'load_run_model']

# the training arguments that decide which model a checkpoint holds (train.py's flag names)
MODEL_SETTINGS = ('model', 'model_kwargs', 'num_classes', 'img_size')
# the training arguments that decide what the model was fed (timm's resolve_data_config reads these)
DATA_SETTINGS = ('mean', 'std', 'interpolation', 'crop_pct')


@dataclass
class LoadedRun:
    """A model rebuilt from a checkpoint, with what it was rebuilt from."""
    model: nn.Module
    checkpoint: Optional[Dict[str, Any]]
    settings: Dict[str, Any]
    train_args: Dict[str, Any] = field(default_factory=dict)

    def data_settings(self) -> Dict[str, Any]:
        """The run's normalisation and resizing flags that were set (for timm's resolve_data_config)."""
        return {k: self.train_args[k] for k in DATA_SETTINGS if self.train_args.get(k) not in (None, '')}


def run_args(checkpoint: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The training arguments a checkpoint was saved with, as a dict ({} if none)."""
    args = (checkpoint or {}).get('args')
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, dict):
        return args
    raise ValueError(f"the checkpoint's training args are a {type(args).__name__}, expected an argparse.Namespace "
                     'or a dict')


def resolve_model_settings(saved: Dict[str, Any], requested: Dict[str, Any], what: str = 'the checkpoint') -> Dict[str, Any]:
    """The model settings to rebuild a checkpoint's model with: its own, the command line's where it has none.

    ``saved``: the training arguments stored in the checkpoint, empty if none. ``requested``: the
    settings the command line gave explicitly. A requested value that contradicts a saved one (a
    different model, number of classes, image size, or any ``--model-kwargs`` key other than the run's)
    is refused with a ValueError naming the setting. A model saved under one of the hmixer authors'
    entry point names (``paramixer_s16_224_ni2``) is rebuilt as the model and settings that reproduce
    it here (``hmixer_parallel_s16_224``, ``n_iter=2``).
    """
    settings = {key: saved.get(key) for key in MODEL_SETTINGS}
    if not isinstance(saved.get('model_kwargs') or {}, dict):
        raise ValueError(f"{what}: its training args hold model_kwargs as a {type(saved['model_kwargs']).__name__}, "
                         'expected a dict')
    settings['model_kwargs'] = upgrade_model_kwargs(saved.get('model_kwargs') or {})
    if settings['model'] in AUTHORS_MODELS:
        settings['model'], their_kwargs = AUTHORS_MODELS[settings['model']]
        settings['model_kwargs'] = {**their_kwargs, **settings['model_kwargs']}
    if not saved:  # a bare state dict: the command line says what it is
        settings.update({key: value for key, value in requested.items() if value is not None})
        return settings
    for key, value in requested.items():
        if key == 'model_kwargs':
            run_kwargs = settings['model_kwargs']
            for name, v in value.items():
                if name in run_kwargs and run_kwargs[name] == v:
                    continue
                trained = (f'{name}={run_kwargs[name]!r}' if name in run_kwargs
                           else f'without {name} (its --model-kwargs: {_kwargs_text(run_kwargs)})')
                raise ValueError(f'model setting {name}: {what} was trained {"with " if name in run_kwargs else ""}'
                                 f'{trained}, but the command line asks --model-kwargs {name}={v!r}; a checkpoint '
                                 'is rebuilt with its own settings, drop it from the command line')
        elif value is not None and settings.get(key) is not None and settings[key] != value:
            flag = '--' + key.replace('_', '-')
            raise ValueError(f'model setting {key}: {what} was trained with {flag} {settings[key]!r}, but the command '
                             f'line asks {flag} {value!r}; a checkpoint is rebuilt with its own settings, drop it from '
                             'the command line')
        elif value is not None:
            settings[key] = value
    return settings


def _kwargs_text(kwargs: Dict[str, Any]) -> str:
    return ' '.join(f'{k}={v!r}' for k, v in kwargs.items()) or 'none'


def model_build_kwargs(settings: Dict[str, Any]) -> Dict[str, Any]:
    """``timm.create_model`` keyword arguments for model settings (see :func:`resolve_model_settings`)."""
    kwargs = dict(settings.get('model_kwargs') or {})
    if settings.get('num_classes') is not None:
        kwargs['num_classes'] = settings['num_classes']
    cfg = timm.get_pretrained_cfg(settings['model']) if settings.get('model') else None
    if settings.get('img_size') is not None and cfg is not None and cfg.fixed_input_size:
        # a fixed-size model (the flatten head) is built for the size the data has
        kwargs['img_size'] = settings['img_size']
    return kwargs


def check_checkpoint_arch(checkpoint: Dict[str, Any], model: nn.Module, what: str = 'checkpoint') -> None:
    """Let ``model`` refuse a training checkpoint whose weights fit but whose training settings (its
    ``arch`` and ``args``) name another function, e.g. an hmixer trained with another ``n_iter``."""
    check = getattr(model, 'check_checkpoint_arch', None)
    if check is not None:
        check(checkpoint, what)


def load_run_model(
        checkpoint_path: Union[str, Dict[str, Any]] = '',
        model: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        num_classes: Optional[int] = None,
        img_size: Optional[int] = None,
        pretrained: bool = False,
        use_ema: bool = False,
        tag: Optional[str] = None,
        create_kwargs: Optional[Dict[str, Any]] = None,
        what: Optional[str] = None,
) -> LoadedRun:
    """The model of a training checkpoint (or of ``model`` alone), built as the run built it.

    ``checkpoint_path``: a checkpoint file, or one already read with ``read_checkpoint``.
    ``model``, ``model_kwargs``, ``num_classes``, ``img_size``: what the command line asked; a checkpoint's
    own settings win, and a contradiction is refused naming the setting. ``use_ema``: the EMA weights
    (refused if the checkpoint has none); never taken silently. ``tag``: a pretrained tag whose cfg
    (classes, preprocessing) the model takes, when the model has one. ``create_kwargs``: more
    ``timm.create_model`` arguments that do not define the model (drop rates, ...).
    """
    if isinstance(checkpoint_path, dict):
        checkpoint, what = checkpoint_path, what or 'the checkpoint'
    else:
        what = what or f'checkpoint {checkpoint_path!r}'
        checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path else None
    if checkpoint is not None and pretrained:
        raise ValueError(f'{what} and pretrained weights (--pretrained) were both asked for; give one')
    saved = run_args(checkpoint)
    requested = dict(model=model, model_kwargs=dict(model_kwargs or {}), num_classes=num_classes, img_size=img_size)
    settings = resolve_model_settings(saved, requested, what)
    name = settings['model']
    if not name:
        raise ValueError(f'{what} records no training args: give the model name (--model)')
    if not timm.is_model(name):
        close = timm.list_models(f'*{name.split("_")[0]}*')[:10]
        raise ValueError(f'unknown model {name!r}' + (f'; similar names: {close}' if close else ''))
    if tag and timm.list_pretrained(f'{name}.{tag}'):
        name = f'{name}.{tag}'
    built = timm.create_model(name, pretrained=pretrained, **model_build_kwargs(settings), **(create_kwargs or {}))
    if checkpoint is not None:
        state_dict = model_state_dict(checkpoint, use_ema=use_ema)
        check_state_dict(state_dict, built, what)
        check_checkpoint_arch(checkpoint, built, what)
        built.load_state_dict(state_dict)
    return LoadedRun(built, checkpoint, settings, saved)
