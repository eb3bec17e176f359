"""Checks of model keyword arguments, in one place for every model.

Keyword arguments arrive from Python, from ``--model-kwargs`` (timm's ParseKwargs turns ``gwl=False``
into False but leaves ``gwl=false`` a string) and from YAML or JSON configs. A string such as
``'false'`` is true in Python, so a flag is parsed here, or refused with what was expected and what came.
"""
import numbers
from typing import Any, Optional

__all__ = ['to_bool', 'to_int', 'to_bottleneck']

_TRUE = ('true', 'yes', 'on', '1')
_FALSE = ('false', 'no', 'off', '0')


def to_bool(name: str, value: Any) -> bool:
    """``value`` as a bool: a bool, 0 or 1, or one of the words true/false, yes/no, on/off (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f'{name} must be True or False, got {value!r}')


def to_int(name: str, value: Any, minimum: int = 1, what: str = 'an integer') -> int:
    """``value`` as an int >= ``minimum``; a bool, a float or a string is refused, naming what came."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum:
        return int(value)
    raise ValueError(f'{name} must be >= {minimum} ({what}), got {value!r}')


def to_bottleneck(value: Any) -> Optional[int]:
    """The top-k of a bottleneck setting, None for the dense ablation (``'none'``)."""
    if isinstance(value, str) and value.strip().lower() == 'none':
        return None
    return to_int('bottleneck', value, what="an integer, the top-k, or 'none' for dense attention")
