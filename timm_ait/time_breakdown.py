"""Where the time of training steps goes: a ``torch.profiler`` trace split by operator and by module.

``torch.profiler`` gives each operator's own (self) CPU time but knows modules only by the Python stack.
:func:`module_ranges` marks every module's forward as a profiler range, and :func:`time_breakdown` charges
each operator's self time to the innermost module range it ran in: forward operators directly, backward
operators through their autograd node, whose sequence number is that of the forward operator that made it
(so a matrix product's backward lands on the ``Linear`` whose forward made it). What ran outside any module
(the loss, the optimizer, loading, the guard) is charged to ``(outside)`` and, if the caller marked them with
``record_function('## name')``, to those names. Self times partition the time the profiled operators took;
Python between operators is not in them (``total_ms`` against the caller's wall clock shows how much that is).
"""
import re
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn
from torch.autograd.profiler import record_function

__all__ = ['BACKWARD_PREFIX', 'RANGE_PREFIX', 'format_breakdown', 'module_ranges', 'time_breakdown']

RANGE_PREFIX = '## '
BACKWARD_PREFIX = 'autograd::engine::evaluate_function: '
OUTSIDE = '(outside)'
_INDEX = re.compile(r'\.\d+(?=\.|$)')


def _pattern(name: str) -> str:
    """'blocks.3.mlp.read' -> 'blocks.*.mlp.read': the layers of a stack summed as one row."""
    return _INDEX.sub('.*', name)


@contextmanager
def module_ranges(model: nn.Module, prefix: str = '') -> Iterator[None]:
    """Mark the forward of every submodule of ``model`` as a profiler range named ``'## <prefix><name>'``.

    Hooks, removed on exit; for eager profiling only (a range per module call costs microseconds).
    """
    stack: List[record_function] = []

    def enter(name):
        def hook(module, args):
            r = record_function(RANGE_PREFIX + prefix + name)
            r.__enter__()
            stack.append(r)
        return hook

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _range_of(event) -> Optional[str]:
    """The innermost '## ' range enclosing ``event`` (itself included), or None."""
    e = event
    while e is not None:
        if e.name.startswith(RANGE_PREFIX):
            return e.name[len(RANGE_PREFIX):]
        e = e.cpu_parent
    return None


def _backward_node(event):
    """The autograd node evaluation enclosing ``event`` (itself included), or None."""
    e = event
    while e is not None:
        if e.name.startswith(BACKWARD_PREFIX):
            return e
        e = e.cpu_parent
    return None


def time_breakdown(events: Iterable, group_layers: bool = True) -> Dict:
    """Self CPU time (ms) by operator and by (module, forward/backward) of profiler ``events``
    (``prof.events()``, recorded under :func:`module_ranges`).

    A backward operator is charged to the module of the forward operator with its node's sequence number
    (on the forward's thread); one whose forward ran outside any module (the loss) to ``(outside)``.
    ``group_layers`` sums 'blocks.0.x' and 'blocks.1.x' as 'blocks.*.x'.
    """
    events = list(events)
    module_of_seq = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(BACKWARD_PREFIX) and _backward_node(e) is None:
            # the outermost op of a sequence number made the node; its range is the module
            key = (e.thread, e.sequence_nr)
            if key not in module_of_seq:
                module_of_seq[key] = _range_of(e)
    ops, modules, counts = defaultdict(float), defaultdict(float), defaultdict(int)
    module_ops = defaultdict(lambda: defaultdict(float))
    total = 0.0
    for e in events:
        if e.name.startswith(RANGE_PREFIX) or e.device_type != torch.autograd.DeviceType.CPU:
            continue  # a range's own time is the hooks' Python, not work
        ms = e.self_cpu_time_total / 1e3
        if ms == 0:
            continue
        total += ms
        ops[e.name] += ms
        counts[e.name] += 1
        node = _backward_node(e)
        if node is None:
            module, phase = _range_of(e), 'forward'
        else:
            module, phase = module_of_seq.get((node.fwd_thread, node.sequence_nr)), 'backward'
        module = OUTSIDE if module is None else (_pattern(module) if group_layers else module)
        modules[module, phase] += ms
        module_ops[module][f'{e.name} ({phase})'] += ms
    by_module = defaultdict(lambda: {'forward_ms': 0.0, 'backward_ms': 0.0})
    for (module, phase), ms in modules.items():
        by_module[module][f'{phase}_ms'] += ms
    return dict(
        total_ms=total,
        ops={name: dict(self_ms=ms, calls=counts[name]) for name, ms in sorted(ops.items(), key=lambda kv: -kv[1])},
        modules={m: dict(v, total_ms=v['forward_ms'] + v['backward_ms'],
                         ops=dict(sorted(module_ops[m].items(), key=lambda kv: -kv[1])))
                 for m, v in sorted(by_module.items(), key=lambda kv: -(kv[1]['forward_ms'] + kv[1]['backward_ms']))},
    )


def format_breakdown(breakdowns: Sequence[Dict], labels: Sequence[str], key: str = 'modules', steps: int = 1,
                     top: int = 25, min_ms: float = 0.0) -> str:
    """A markdown table of ms per step by module (or operator, ``key='ops'``), one column per breakdown,
    and the difference of the first two; rows by the first breakdown's time."""
    def ms(b, name):
        entry = b[key].get(name)
        if entry is None:
            return 0.0
        return (entry['total_ms'] if key == 'modules' else entry['self_ms']) / steps

    names = []
    for b in breakdowns:
        names += [n for n in b[key] if n not in names]
    names.sort(key=lambda n: -max(ms(b, n) for b in breakdowns))
    head = '| ' + ('module' if key == 'modules' else 'operator') + ' | ' + ' | '.join(
        f'{label} ms/step' for label in labels)
    rows = [head + (' | difference |' if len(breakdowns) > 1 else ' |'),
            '|' + '---|' * (len(breakdowns) + 1 + (len(breakdowns) > 1))]
    shown = [n for n in names if max(ms(b, n) for b in breakdowns) >= min_ms][:top]
    for n in shown:
        values = [ms(b, n) for b in breakdowns]
        cells = ' | '.join(f'{v:.1f}' for v in values)
        if key == 'modules' and breakdowns[0][key].get(n):
            entry = breakdowns[0][key][n]
            cells = (f"{values[0]:.1f} ({entry['forward_ms'] / steps:.1f} + {entry['backward_ms'] / steps:.1f})"
                     + (' | ' + ' | '.join(f'{v:.1f}' for v in values[1:]) if len(values) > 1 else ''))
        diff = f' | {values[0] - values[1]:+.1f}' if len(values) > 1 else ''
        rows.append(f'| {n} | {cells}{diff} |')
    totals = [b['total_ms'] / steps for b in breakdowns]
    diff = f' | {totals[0] - totals[1]:+.1f}' if len(totals) > 1 else ''
    rows.append('| all operators | ' + ' | '.join(f'{t:.1f}' for t in totals) + diff + ' |')
    return '\n'.join(rows)
