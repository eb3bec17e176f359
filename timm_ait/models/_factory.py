"""Keyword arguments whose None means something, through ``timm.create_model``.

``timm.create_model`` drops every keyword argument whose value is None before it calls a model's
entrypoint (so that unset script flags keep a model's defaults). For AiT ``bottleneck=None`` is
not "unset" but the dense ablation, and dropping it silently builds the top-k model instead. Nothing
downstream of that filter can tell the two apart, so ``create_model`` itself is wrapped (once, when
timm_ait is imported): for the AiT models only, such a None is passed on as :data:`DENSE`, which the
model reads as None, and the model's recorded factory arguments (``model._model_args``, written to a
Hub ``config.json``) get the None back, so a saved model rebuilds as it was.
"""
import functools

import timm
import timm.models
import timm.models._factory
from timm.models import is_model, model_entrypoint, parse_model_name, split_model_name_tag

__all__ = ['DENSE', 'NONE_MEANS_SOMETHING']

# the AiT arguments for which None is a setting, not "use the default"
NONE_MEANS_SOMETHING = ('bottleneck',)
_AIT_MODULES = ('timm_ait.models.ait', 'timm_ait.models.ait_relational', 'timm_ait.models.ait_tiny')


class _Dense:
    """Stands for ``bottleneck=None`` on its way through timm's None filter."""

    def __repr__(self) -> str:
        return 'None'


DENSE = _Dense()


def _is_ait(model_name: str) -> bool:
    source, name = parse_model_name(model_name)
    if source:  # hf-hub: / local-dir: read their arguments (None included) from config.json
        return False
    arch, _ = split_model_name_tag(name)
    return is_model(arch) and model_entrypoint(arch).__module__ in _AIT_MODULES


def _keep_meaningful_none(create_model):
    @functools.wraps(create_model)
    def wrapper(model_name, *args, **kwargs):
        kept = [k for k in NONE_MEANS_SOMETHING if k in kwargs and kwargs[k] is None]
        if kept and _is_ait(model_name):
            kwargs.update({k: DENSE for k in kept})
            model = create_model(model_name, *args, **kwargs)
            if isinstance(getattr(model, '_model_args', None), dict):
                model._model_args.update({k: None for k in kept})
            return model
        return create_model(model_name, *args, **kwargs)

    wrapper.__timm_ait_wrapped__ = create_model
    return wrapper


def _install() -> None:
    original = timm.models._factory.create_model
    if hasattr(original, '__timm_ait_wrapped__'):
        return
    wrapped = _keep_meaningful_none(original)
    for module in (timm, timm.models, timm.models._factory):
        if getattr(module, 'create_model', None) is original:
            module.create_model = wrapped


_install()
