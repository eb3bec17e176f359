"""Benchmark a timm model: inference and training throughput, peak memory, parameters, FLOPs.

    python train_scripts/benchmark.py -m ait_small_patch4_32 -b 64 --compare gwl=False
    python train_scripts/benchmark.py --epochs triangle --epoch-samples 12800 --repeats 3  # whole epochs

``--compare`` benchmarks a second model in the same run: another model name (with its own
``k=v`` arguments after it), or ``k=v`` changes to the first model's arguments. The two
models take turns, one timed run each per repeat, in alternating order (A B, B A, ...), so
that a machine whose speed drifts (other jobs, clocks) slows both alike. Ratios are always
model / compare.

What is measured, per model and per mode (inference, train):

* step time: the mean over ``--num-bench-iter`` steps, for each of ``--repeats`` runs, after
  ``--num-warm-iter`` untimed steps before a model's first run of a mode. Reported: the median
  run, the fastest run and the range. Time ratios: the median of the per-repeat ratios, with
  a 95% bootstrap interval, and the ratio of the fastest runs (other jobs only ever slow a run
  down, so with enough repeats the fastest runs are the least disturbed). A training step is forward,
  loss (cross-entropy, and the GWL's own balance term, 1e-2 times its balance loss, when the model has
  one), backward and an AdamW step.
  Both wall-clock time and this process's CPU time (all its threads) are taken: on a machine
  shared with other jobs, CPU time leaves out the time spent waiting for a core, so its ratios
  are steadier (use ``--threads 1`` there, as waiting OpenMP threads spin and count as CPU
  time).
* peak memory: the most memory in use at once while building a fresh model and running two
  steps, above what was in use before (so weights, gradients, optimizer state, activations
  and the batch count). CUDA: ``torch.cuda.max_memory_allocated``. CPU: the peak resident set
  size (VmHWM in /proc/self/status, reset through /proc/self/clear_refs, Linux only), in a
  fresh process forked from a server that has imported torch and never run a model: in a
  process that already ran a model, the allocator reuses the pages it freed, which would hide
  most of the next model's peak. In that process glibc maps every tensor over 128 KiB on its
  own, so the peak follows the tensors in use rather than the allocator's history and repeats
  to 0.1 MiB (a default process keeps freed blocks in its heap and peaked 20-30% higher, by an
  amount that varies from run to run). The CPU figure also holds the few MiB of library code a
  step touches first.
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one eager step (inference:
  forward; train: forward and backward), per image. It counts matrix products and attention;
  gathers, softmax, norms and element-wise ops are not counted. Formulas missing from torch
  (CPU attention, in-place addmm_) are added (``timm_ait.profiling``). ``--flops-modules REGEX`` also reports the
  share of the modules whose name matches (e.g. ``'mlp\\.read$'``: the GWL's Hopfield read) in
  inference; not in training, as the counter credits backward ops to modules only roughly.
* with ``--profile``: where the time of ``--num-bench-iter`` more steps goes, by module (forward and
  backward: a backward operator is charged to the module whose forward made its autograd node) and by
  operator, from ``torch.profiler`` (:mod:`timm_ait.time_breakdown`; host time, eager only).

``--epochs`` times whole training epochs instead: pairs of train.py configs (the AiT's, then its twin's), each
epoch a fresh train.py process, alternating; with ``--profile`` one more epoch of each runs under
``train.py --profile``.

``--speed-modes`` compares CPU speed settings instead (step times only): each mode is a
'+'-joined set of tokens over the other flags, ``fp32``/``bf16``/``fp16`` (autocast dtype),
``cl`` (channels-last), ``tN`` (N threads), ``compile`` (torch.compile, inductor), e.g.
``--speed-modes fp32 bf16 cl t2 compile``. Every mode has its own pair of models (same initial
weights); each repeat runs every mode and model once, modes and models in alternating order, so
the model / compare ratio of each mode and each mode's speed-up over the first mode are both
per-repeat ratios. Minor page faults per step are reported beside the times: on a virtual
machine a fresh page costs a trap and a zeroing, so an allocator that hands freed tensors back to
the kernel and maps them again every step is slow; ``--keep-freed-memory`` keeps them in the
heap (:func:`timm_ait.cpu_speed.keep_freed_memory`) for the whole process.
"""
import argparse
import csv
import difflib
import json
import multiprocessing
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import timm
from timm.data import resolve_data_config
from timm.layers import to_2tuple
from timm.models import get_pretrained_cfg_value
from timm.utils import ParseKwargs

from .cpu_speed import CPU_TRAINING_ENV, INITIAL_MMAP_THRESHOLD, keep_freed_memory, minor_page_faults, set_malloc_thresholds
from .layers import set_balance_loss_scale
from .profiling import flop_counter
from .time_breakdown import format_breakdown, module_ranges, time_breakdown

MODES = ('inference', 'train')
MEMORY_STEPS = 2  # the second training step holds optimizer state, gradients and activations at once
MIB = 2 ** 20
# StepTime field -> name in the results: wall-clock 'step' time and process 'cpu' time
CLOCKS = {'wall': 'step', 'cpu': 'cpu'}


@dataclass(frozen=True)
class ModelSpec:
    """A model to build: a registered timm name and the keyword arguments for create_model."""
    name: str
    kwargs: Dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        args = ', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())
        return f'{self.name}({args})' if args else self.name


@dataclass(frozen=True)
class BenchSettings:
    device: str = 'cpu'
    batch_size: int = 64
    img_size: Optional[int] = None
    amp_dtype: Optional[str] = None  # None: float32; else the autocast dtype, 'bfloat16' or 'float16'
    channels_last: bool = False
    torchcompile: Optional[str] = None  # a torch.compile backend, None for eager
    num_warm_iter: int = 3
    num_bench_iter: int = 10
    threads: Optional[int] = None  # torch.set_num_threads; None keeps torch's default


def parse_kwargs(tokens: Sequence[str]) -> Dict:
    """``['a=1', 'b=None']`` to ``{'a': 1, 'b': None}``, exactly as ``--model-kwargs`` parses them."""
    namespace = argparse.Namespace()
    ParseKwargs(option_strings=[], dest='kwargs')(None, namespace, list(tokens))
    return namespace.kwargs


def compare_spec(tokens: Sequence[str], model: ModelSpec) -> ModelSpec:
    """The model of ``--compare``: ``NAME [k=v ...]``, or ``k=v ...`` applied over ``model``."""
    if '=' in tokens[0]:
        return ModelSpec(model.name, {**model.kwargs, **parse_kwargs(tokens)})
    return ModelSpec(tokens[0], parse_kwargs(tokens[1:]))


def check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise ValueError(f'unknown model {name!r}: timm has no model registered under that name.{hint}')


def build_model(spec: ModelSpec, settings: BenchSettings) -> torch.nn.Module:
    check_model_name(spec.name)
    kwargs = dict(spec.kwargs)
    if settings.img_size and get_pretrained_cfg_value(spec.name, 'fixed_input_size'):
        # a fixed-size model (ViT, AiT) must be built at the benchmarked size
        kwargs.setdefault('img_size', settings.img_size)
    model = timm.create_model(spec.name, **kwargs)
    memory_format = torch.channels_last if settings.channels_last else torch.preserve_format
    return model.to(device=settings.device, memory_format=memory_format)


def _input_size(model: torch.nn.Module, spec: ModelSpec, settings: BenchSettings) -> tuple:
    """(C, H, W) of the benchmark images: the size the model was built at, else its default."""
    input_size = resolve_data_config({}, model=model)['input_size']
    img_size = spec.kwargs.get('img_size') or settings.img_size
    if img_size is None:
        return tuple(input_size)
    return (input_size[0], *to_2tuple(img_size))


class Workload:
    """One model on its device with one random batch, ready to run inference or training steps."""

    def __init__(self, spec: ModelSpec, settings: BenchSettings):
        self.spec = spec
        self.device = torch.device(settings.device)
        self.model = build_model(spec, settings)
        self.forward = self.model
        self.input_size = _input_size(self.model, spec, settings)
        self.images = torch.randn(settings.batch_size, *self.input_size, device=self.device)
        if settings.channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        # a question-answering model takes a question vector per image as its second input
        question_dim = getattr(self.model, 'question_dim', None)
        self.inputs = (self.images,) + ((torch.randn(settings.batch_size, question_dim, device=self.device),)
                                        if question_dim else ())
        num_classes = getattr(self.model, 'num_classes', 0)
        self.targets = torch.randint(max(num_classes, 1), (settings.batch_size,), device=self.device)
        self.amp_dtype = getattr(torch, settings.amp_dtype) if settings.amp_dtype else None
        # AdamW with the paper's settings; its state is allocated by the first step
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

    def compile(self, backend: str) -> None:
        # one graph or an error: a graph break would time a different program than the one asked for
        self.forward = torch.compile(self.model, backend=backend, fullgraph=True)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def inference_step(self) -> None:
        with torch.no_grad(), self._autocast():
            self.forward(*self.inputs)

    def train_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # the balance term must be scaled as the loss is (a tensor: no host sync)
            set_balance_loss_scale(self.model, self.scaler.scale(torch.ones((), device=self.device)))
        with self._autocast():
            logits = self.forward(*self.inputs)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            loss = F.cross_entropy(logits, self.targets)  # a GWL adds its balance term to the backward itself
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def run(self, mode: str, steps: int) -> None:
        """Run ``steps`` steps of ``mode`` and wait until the device has finished them."""
        if mode == 'train' and getattr(self.model, 'num_classes', 0) < 1:
            raise ValueError(f'{self.spec.label} has no classifier (num_classes=0): cannot train it')
        self.model.train(mode == 'train')
        step = self.train_step if mode == 'train' else self.inference_step
        for _ in range(steps):
            step()
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------------------- FLOPs

def count_flops(workload: Workload, mode: str, modules_pattern: Optional[str] = None) -> Dict:
    """FLOPs per image of one eager step; with ``modules_pattern``, also those of the matching modules.

    A module matched inside another matched module is not counted twice.
    """
    with flop_counter() as counter:
        forward, workload.forward = workload.forward, workload.model
        try:
            workload.run(mode, 1)
        finally:
            workload.forward = forward
    batch = workload.images.shape[0]
    result = {'flops_per_image': counter.get_total_flops() / batch}
    if modules_pattern:
        root = type(workload.model).__name__ + '.'
        per_module = {name[len(root):]: sum(ops.values())
                      for name, ops in counter.get_flop_counts().items() if name.startswith(root)}
        matched = sorted(name for name in per_module if re.search(modules_pattern, name))
        outermost = [name for name in matched if not any(name.startswith(m + '.') for m in matched)]
        flops = sum(per_module[name] for name in outermost) / batch
        result['modules'] = {
            'pattern': modules_pattern,
            'matched': outermost,
            'flops_per_image': flops,
            'share': flops / result['flops_per_image'] if result['flops_per_image'] else None,
        }
    return result


# --------------------------------------------------------------------------------- memory

def _proc_status_bytes(key: str) -> int:
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f'{key} not found in /proc/self/status')


class PeakMemoryMeter:
    """The peak memory in use since :meth:`start`, above the memory in use at that moment."""

    def __init__(self, device: torch.device):
        self.device = device
        self.before = 0

    def start(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.before = _proc_status_bytes('VmRSS')
            with open('/proc/self/clear_refs', 'w') as clear_refs:
                clear_refs.write('5')  # resets VmHWM to the current resident set size

    def peak(self) -> int:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.before
        return _proc_status_bytes('VmHWM') - self.before


def peak_memory_of_fresh_model(spec: ModelSpec, settings: BenchSettings, mode: str) -> int:
    """Bytes: build ``spec`` and run MEMORY_STEPS steps of ``mode``, measured from before the build."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    meter = PeakMemoryMeter(torch.device(settings.device))
    meter.start()
    workload = Workload(spec, settings)
    if settings.torchcompile:
        workload.compile(settings.torchcompile)
    workload.run(mode, MEMORY_STEPS)
    return meter.peak()


def _map_large_allocations_individually() -> None:
    """Fix glibc's mmap threshold at its initial 128 KiB, so that every large tensor gets its own
    mapping and gives it back when freed.

    glibc raises the threshold as a process frees large blocks; freed tensors then stay in its
    heap, and the peak RSS depends on the order of allocations: repeated probes of one model
    differed by up to 5% (ait_small, batch 64, train). With the threshold fixed they agree to
    0.1 MiB. Other C libraries are left as they are.
    """
    set_malloc_thresholds(mmap_threshold=INITIAL_MMAP_THRESHOLD)


def _peak_cpu_memory_in_this_process(spec: ModelSpec, settings: BenchSettings, mode: str) -> int:
    _map_large_allocations_individually()
    return peak_memory_of_fresh_model(spec, settings, mode)


def _fresh_process_pool() -> ProcessPoolExecutor:
    """A pool of one new process, forked from a server that has imported torch but run nothing."""
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload(['torch', 'timm', 'timm_ait'])
    return ProcessPoolExecutor(max_workers=1, mp_context=context)


def measure_peak_memory(spec: ModelSpec, settings: BenchSettings, mode: str) -> Optional[int]:
    """Peak memory of ``mode`` in bytes (see the module docstring); None where it cannot be measured."""
    if settings.device.startswith('cuda'):
        return peak_memory_of_fresh_model(spec, settings, mode)
    if not os.path.exists('/proc/self/clear_refs'):
        print('peak CPU memory needs Linux /proc/self/clear_refs; not measured', file=sys.stderr)
        return None
    with _fresh_process_pool() as pool:
        return pool.submit(_peak_cpu_memory_in_this_process, spec, settings, mode).result()


# ------------------------------------------------------------------------------- benchmark

class StepTime(NamedTuple):
    """Seconds per step: wall-clock, and CPU time of this process (all its threads); and the
    minor page faults of this process per step (None where the OS does not count them)."""
    wall: float
    cpu: float
    faults: Optional[float] = None


def time_step(workload: Workload, mode: str, settings: BenchSettings) -> StepTime:
    """The mean time of num_bench_iter steps."""
    faults = minor_page_faults()
    wall, cpu = time.perf_counter(), time.process_time()
    workload.run(mode, settings.num_bench_iter)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    faults = None if faults is None else (minor_page_faults() - faults) / settings.num_bench_iter
    return StepTime(wall / settings.num_bench_iter, cpu / settings.num_bench_iter, faults)


def profile_steps(workload: Workload, mode: str, steps: int) -> Dict:
    """:func:`time_breakdown` of ``steps`` eager steps of ``mode`` under torch.profiler (host time)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
            module_ranges(workload.model):
        started = time.perf_counter()
        workload.run(mode, steps)
        wall = time.perf_counter() - started
    return dict(time_breakdown(prof.events()), steps=steps, wall_ms=1e3 * wall)


def format_profiles(profiles: Dict, labels: Sequence[str]) -> str:
    """Per mode, the modules and the operators of the profiled models side by side (ms per step)."""
    parts = []
    for mode, breakdowns in profiles.items():
        steps = breakdowns[0]['steps']
        walls = ', '.join(f"{label} {b['wall_ms'] / b['steps']:.1f}" for label, b in zip(labels, breakdowns))
        parts.append(f'{mode}, {steps} steps under the profiler (wall ms/step: {walls})\n\n'
                     + format_breakdown(breakdowns, labels, 'modules', steps, top=30, min_ms=0.05) + '\n\n'
                     + format_breakdown(breakdowns, labels, 'ops', steps, top=30, min_ms=0.05))
    return '\n\n'.join(parts)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def benchmark(
        specs: Sequence[ModelSpec],
        settings: BenchSettings,
        modes: Sequence[str] = MODES,
        repeats: int = 3,
        flops_modules: Optional[str] = None,
        profile: bool = False,
) -> Dict:
    """Benchmark one model, or two taking turns; returns the results as a JSON-ready dict.

    ``profile``: afterwards, num_bench_iter more steps of each model and mode under torch.profiler, their
    time by module and operator in ``results['profile']`` (eager only: the modules are marked by hooks).

    Sets torch's thread count to ``settings.threads`` when it is given.
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    for spec in specs:
        check_model_name(spec.name)
    models = [dict(model=spec.name, kwargs=spec.kwargs, label=spec.label) for spec in specs]
    for spec, result in zip(specs, models):
        for mode in modes:
            _log(f'peak memory: {spec.label}, {mode}')
            peak = measure_peak_memory(spec, settings, mode)
            result[mode] = {'peak_memory_mib': None if peak is None else peak / MIB}

    workloads = [Workload(spec, settings) for spec in specs]
    for workload, result in zip(workloads, models):
        result['params'] = sum(p.numel() for p in workload.model.parameters())
        result['input_size'] = list(workload.input_size)
        for mode in modes:
            # per-module FLOPs of a forward only: the counter attributes backward ops to
            # modules only roughly (they land in whichever module's backward is current)
            result[mode].update(count_flops(workload, mode, flops_modules if mode == 'inference' else None))
        if settings.torchcompile:
            workload.compile(settings.torchcompile)

    step_times = {(i, mode): [] for i in range(len(specs)) for mode in modes}
    for repeat in range(repeats):
        order = list(range(len(specs)))
        if repeat % 2:
            order.reverse()
        for mode in modes:
            for i in order:
                if repeat == 0:
                    workloads[i].run(mode, settings.num_warm_iter)
                step = time_step(workloads[i], mode, settings)
                step_times[i, mode].append(step)
                _log(f'repeat {repeat + 1}/{repeats}, {mode}, {specs[i].label}: '
                     f'{1e3 * step.wall:.1f} ms/step ({1e3 * step.cpu:.1f} ms CPU)')

    for i, result in enumerate(models):
        for mode in modes:
            for clock, key in CLOCKS.items():
                runs_ms = [1e3 * getattr(step, clock) for step in step_times[i, mode]]
                result[mode][f'{key}_ms'] = statistics.median(runs_ms)
                result[mode][f'{key}_ms_fastest'] = min(runs_ms)
                result[mode][f'{key}_ms_runs'] = runs_ms
            result[mode]['images_per_s'] = settings.batch_size / result[mode]['step_ms'] * 1e3

    results = dict(settings=asdict(settings), repeats=repeats, environment=_environment(settings), models=models)
    if len(models) == 2:
        results['ratios'] = _ratios(models, step_times, modes)
    if profile:
        results['profile'] = {mode: [profile_steps(w, mode, settings.num_bench_iter) for w in workloads]
                              for mode in modes}
    return results


def median_interval(values: Sequence[float], level: float = 0.95, resamples: int = 2000) -> List[float]:
    """Percentile-bootstrap interval of the median of ``values`` (seeded: the same values give
    the same interval)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = int(resamples * (1 - level) / 2)
    return [medians[tail], medians[-tail - 1]]


# ------------------------------------------------------------------------------- whole epochs
# Whole training epochs of an AiT and its ViT twin (--epochs): what a run pays beyond its steps (loading, the
# memory statistics, the log reads). Each repeat trains one epoch of each config of a pair, alternating
# (A B, B A, ...), each in a fresh train.py process with the CPU training environment, and reads the epoch's
# train_time_s from its summary.csv (loading included, evaluation not).

# the registered CPU configs (train_scripts/configs/cpu/): the AiT's, then its twin's
CPU_PAIRS = {
    'triangle': ('triangle-ait_small_patch32_64.yaml', 'triangle-vit_small_patch32_64.yaml'),
    'sort_of_clevr': ('sort_of_clevr-ait_small_w256_patch15_75.yaml', 'sort_of_clevr-vit_small_w256_patch15_75.yaml'),
}


def _epoch_seconds(config: str, folder: str, data_dir: str, num_samples: Optional[int], python: str,
                   extra: Sequence[str]) -> float:
    command = [python, '-m', 'timm_ait.train', '-c', config, '--epochs', '1', '--output', folder,
               '--experiment', 'run', '--data-dir', data_dir, '--val-num-samples', '64', *extra]
    if num_samples is not None:
        command += ['--train-num-samples', str(num_samples)]
    proc = subprocess.run(command, env={**os.environ, **CPU_TRAINING_ENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ['no output'])[-1]
        raise RuntimeError(f'train.py on {config} failed ({proc.returncode}): {last}')
    with open(os.path.join(folder, 'run', 'summary.csv'), newline='') as f:
        return float(list(csv.DictReader(f))[-1]['train_time_s'])


def time_epochs(
        pairs: Sequence[Tuple[str, str]],
        repeats: int,
        data_dir: str,
        num_samples: Optional[int] = None,
        python: str = sys.executable,
        extra: Sequence[str] = (),
        profile: bool = False,
) -> Dict:
    """Seconds of one training epoch of each config, ``repeats`` times, the two of a pair alternating.

    ``profile``: then one more epoch of each under torch.profiler (train.py --profile), whose time by module
    and operator goes into the pair's ``profile``.
    """
    for config in (c for pair in pairs for c in pair):
        if not os.path.isfile(config):
            raise ValueError(f'--epochs: config {config!r} does not exist')
    if repeats < 1:
        raise ValueError(f'--repeats must be >= 1, got {repeats}')
    results = {'pairs': [], 'num_samples': num_samples, 'repeats': repeats}
    for model, twin in pairs:
        times: Dict[str, List[float]] = {model: [], twin: []}
        for repeat in range(repeats):
            for config in ((model, twin) if repeat % 2 == 0 else (twin, model)):
                with tempfile.TemporaryDirectory() as folder:
                    times[config].append(_epoch_seconds(config, folder, data_dir, num_samples, python, extra))
        ratios = [a / b for a, b in zip(times[model], times[twin])]
        results['pairs'].append(dict(
            model=model, compare=twin, model_seconds=times[model], compare_seconds=times[twin],
            ratio=statistics.median(ratios), ratio_interval=median_interval(ratios) if len(ratios) > 1 else None))
        if profile:  # one more epoch each, not timed: the profiler slows it
            breakdowns = []
            for config in (model, twin):
                with tempfile.TemporaryDirectory() as folder:
                    path = os.path.join(folder, 'profile.json')
                    _epoch_seconds(config, folder, data_dir, num_samples, python, [*extra, '--profile', path])
                    if not os.path.isfile(path):
                        raise RuntimeError(f'train.py on {config} wrote no profile (its log says why)')
                    with open(path) as f:
                        breakdowns.append(json.load(f))
            results['pairs'][-1]['profile'] = breakdowns
    return results


def format_epoch_table(results: Dict) -> str:
    lines = ['| config | epoch s (median) | twin | twin epoch s | ratio (95% interval) |', '|---|---|---|---|---|']
    for pair in results['pairs']:
        interval = pair['ratio_interval']
        ratio = f"{pair['ratio']:.3f}" + (f' ({interval[0]:.3f}-{interval[1]:.3f})' if interval else '')
        lines.append(f"| {os.path.basename(pair['model'])} | {statistics.median(pair['model_seconds']):.1f} | "
                     f"{os.path.basename(pair['compare'])} | {statistics.median(pair['compare_seconds']):.1f} | {ratio} |")
    return '\n'.join(lines)


def _ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def _ratios(models: List[Dict], step_times: Dict, modes: Sequence[str]) -> Dict:
    """model / compare. Times: the median of the per-repeat ratios, and the ratio of the fastest runs."""
    model, compare = models
    ratios = {'params': _ratio(model['params'], compare['params'])}
    for mode in modes:
        ratios[mode] = dict(
            peak_memory=_ratio(model[mode]['peak_memory_mib'], compare[mode]['peak_memory_mib']),
            flops=_ratio(model[mode]['flops_per_image'], compare[mode]['flops_per_image']),
        )
        for clock, key in CLOCKS.items():
            per_repeat = [getattr(a, clock) / getattr(b, clock)
                          for a, b in zip(step_times[0, mode], step_times[1, mode])]
            ratios[mode][f'{key}_time'] = statistics.median(per_repeat)
            ratios[mode][f'{key}_time_interval'] = median_interval(per_repeat)
            ratios[mode][f'{key}_time_fastest'] = model[mode][f'{key}_ms_fastest'] / compare[mode][f'{key}_ms_fastest']
            ratios[mode][f'{key}_time_runs'] = per_repeat
    return ratios


# ------------------------------------------------------------------------------ speed modes

PRECISIONS = {'fp32': None, 'bf16': 'bfloat16', 'fp16': 'float16'}
SPEED_TOKENS = ('fp32', 'bf16', 'fp16', 'cl', 'tN', 'compile')


def parse_speed_mode(text: str, base: BenchSettings) -> BenchSettings:
    """``'bf16+cl+t2'`` to ``base`` with bf16 autocast, channels-last and 2 threads."""
    changes = {}

    def set_once(key, value, token):
        if key in changes:
            raise ValueError(f'speed mode {text!r} sets {key} twice (at {token!r})')
        changes[key] = value

    for token in text.split('+'):
        if token in PRECISIONS:
            set_once('amp_dtype', PRECISIONS[token], token)
        elif token == 'cl':
            set_once('channels_last', True, token)
        elif token == 'compile':
            set_once('torchcompile', 'inductor', token)
        elif re.fullmatch(r't[1-9][0-9]*', token):
            set_once('threads', int(token[1:]), token)
        else:
            raise ValueError(f'unknown token {token!r} in speed mode {text!r}; a speed mode is tokens joined by '
                             f"'+', each one of fp32, bf16, fp16 (autocast dtype), cl (channels-last), "
                             f'tN (N threads, e.g. t2), compile (torch.compile, inductor)')
    return replace(base, **changes)


def _stats(values: Sequence[float]) -> Dict:
    return dict(median=statistics.median(values), interval=median_interval(values), fastest=min(values),
                runs=list(values))


def benchmark_speed_modes(
        specs: Sequence[ModelSpec],
        speed_modes: Dict[str, BenchSettings],
        modes: Sequence[str] = ('train',),
        repeats: int = 3,
) -> Dict:
    """Step times of one model, or two, under each speed mode, all in one process.

    Each (speed mode, model) has its own workload, built from the same seed. Each repeat runs
    every speed mode and, within it, every model once; the order of both is reversed every
    other repeat. Ratios are per repeat: model / compare within a speed mode, and each speed
    mode's speed-up over the first one (first mode's time / this mode's time) per model.
    """
    for spec in specs:
        check_model_name(spec.name)
    default_threads = torch.get_num_threads()
    names = list(speed_modes)
    workloads = {}
    for name in names:
        for i, spec in enumerate(specs):
            torch.manual_seed(0)  # the same initial weights in every mode
            workloads[name, i] = Workload(spec, speed_modes[name])
            if speed_modes[name].torchcompile:
                workloads[name, i].compile(speed_modes[name].torchcompile)
    times = {(name, i, mode): [] for name in names for i in range(len(specs)) for mode in modes}
    try:
        for repeat in range(repeats):
            order = list(range(len(specs)))
            mode_order = list(names)
            if repeat % 2:
                order.reverse()
                mode_order.reverse()
            for name in mode_order:
                settings = speed_modes[name]
                # inductor's kernels take the thread count in use when they are compiled (first run)
                torch.set_num_threads(settings.threads or default_threads)
                for mode in modes:
                    for i in order:
                        if repeat == 0:
                            workloads[name, i].run(mode, settings.num_warm_iter)
                        step = time_step(workloads[name, i], mode, settings)
                        times[name, i, mode].append(step)
                        _log(f'repeat {repeat + 1}/{repeats}, {name}, {mode}, {specs[i].label}: '
                             f'{1e3 * step.wall:.1f} ms/step ({1e3 * step.cpu:.1f} ms CPU)')
    finally:
        torch.set_num_threads(default_threads)

    per_mode = {}
    for name in names:
        batch = speed_modes[name].batch_size
        result = dict(settings=asdict(speed_modes[name]), models=[], ratios={}, speedup={})
        for i in range(len(specs)):
            model = {}
            for mode in modes:
                runs = times[name, i, mode]
                wall = [1e3 * t.wall for t in runs]
                faults = [t.faults for t in runs if t.faults is not None]
                model[mode] = dict(
                    step_ms=statistics.median(wall), step_ms_fastest=min(wall), step_ms_runs=wall,
                    cpu_ms=statistics.median([1e3 * t.cpu for t in runs]),
                    images_per_s=batch / statistics.median(wall) * 1e3,
                    page_faults_per_step=statistics.median(faults) if faults else None)
            result['models'].append(model)
        for mode in modes:
            if len(specs) == 2:
                result['ratios'][mode] = {
                    clock: _stats([getattr(a, clock) / getattr(b, clock)
                                   for a, b in zip(times[name, 0, mode], times[name, 1, mode])])
                    for clock in CLOCKS}
            result['speedup'][mode] = [
                _stats([first.wall / this.wall for first, this in zip(times[names[0], i, mode], times[name, i, mode])])
                for i in range(len(specs))]
        per_mode[name] = result
    return dict(models=[dict(model=spec.name, kwargs=spec.kwargs, label=spec.label) for spec in specs],
                repeats=repeats, environment=_environment(speed_modes[names[0]]), speed_modes=per_mode)


def format_speed_table(results: Dict) -> str:
    models = results['models']
    names = list(results['speed_modes'])
    first = names[0]
    two = len(models) == 2
    lines = [f'{title}: {m["label"]}' for title, m in zip(('model', 'compare'), models)]
    for mode in next(iter(results['speed_modes'].values()))['models'][0]:
        header = ['speed mode', 'model img/s'] + (['compare img/s', 'model/compare (95% interval)'] if two else [])
        header += [f'model speed-up vs {first}'] + ([f'compare speed-up vs {first}'] if two else [])
        header += ['page faults/step']
        rows = [header]
        for name in names:
            r = results['speed_modes'][name]
            row = [name] + [f'{m[mode]["images_per_s"]:.1f}' for m in r['models'][:1]]
            if two:
                ratio = r['ratios'][mode]['wall']
                row += [f'{r["models"][1][mode]["images_per_s"]:.1f}',
                        f'{ratio["median"]:.3f} ({ratio["interval"][0]:.3f}-{ratio["interval"][1]:.3f})']
            row += [f'{s["median"]:.3f}x' for s in r['speedup'][mode]]
            faults = [m[mode]['page_faults_per_step'] for m in r['models']]
            row.append(' / '.join('n/a' if f is None else f'{f:.0f}' for f in faults))
            rows.append(row)
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        lines.append(f'{mode}:')
        lines += ['  ' + '  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    settings = results['speed_modes'][first]['settings']
    env = results['environment']
    lines.append(f"device {settings['device']} ({env['device_name']}), batch {settings['batch_size']}, "
                 f"{settings['num_warm_iter']} warm-up steps, then {results['repeats']} repeats of "
                 f"{settings['num_bench_iter']} timed steps; medians of per-repeat ratios; torch {env['torch']}, "
                 f"timm {env['timm']}; freed memory kept in the heap: {env.get('keep_freed_memory', False)}")
    return '\n'.join(lines)


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            for line in cpuinfo:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def _environment(settings: BenchSettings) -> Dict:
    if settings.device.startswith('cuda'):
        device_name = torch.cuda.get_device_name(torch.device(settings.device))
    else:
        device_name = f'{_cpu_name()}, {os.cpu_count()} cores'
    return dict(torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
                device_name=device_name, cpu_threads=torch.get_num_threads())


# ---------------------------------------------------------------------------------- output

def format_table(results: Dict) -> str:
    models = results['models']
    ratios = results.get('ratios')
    header = ['', 'model'] + (['compare', 'ratio'] if ratios else [])
    rows = [header]

    def add(name, values, ratio='', fmt='{:.2f}'):
        cells = [name] + ['n/a' if v is None else fmt.format(v) for v in values]
        if ratios:
            cells.append('n/a' if ratio is None else ratio if isinstance(ratio, str) else f'{ratio:.3f}x')
        rows.append(cells)

    def span(values, digits):
        return f'{min(values):.{digits}f}-{max(values):.{digits}f}'

    add('params (M)', [m['params'] / 1e6 for m in models], ratios['params'] if ratios else '')
    for mode in MODES:
        if mode not in models[0]:
            continue
        mode_ratios = ratios[mode] if ratios else {}
        for key, title in (('step', 'step (ms)'), ('cpu', 'step CPU time (ms)')):
            add(f'{mode} {title}, median', [m[mode][f'{key}_ms'] for m in models], mode_ratios.get(f'{key}_time'))
            add(f'{mode} {title}, fastest', [m[mode][f'{key}_ms_fastest'] for m in models],
                mode_ratios.get(f'{key}_time_fastest'))
            add(f'{mode} {title}, range of runs', [span(m[mode][f'{key}_ms_runs'], 1) for m in models],
                span(mode_ratios[f'{key}_time_runs'], 3) if ratios else '', fmt='{}')
            if ratios:
                add(f'{mode} {title}, median ratio: 95% interval', ['', ''],
                    span(mode_ratios[f'{key}_time_interval'], 3), fmt='{}')
        add(f'{mode} images/s', [m[mode]['images_per_s'] for m in models], fmt='{:.1f}')
        add(f'{mode} peak memory (MiB)', [m[mode]['peak_memory_mib'] for m in models],
            mode_ratios.get('peak_memory'), fmt='{:.1f}')
        add(f'{mode} GFLOPs / image', [m[mode]['flops_per_image'] / 1e9 for m in models],
            mode_ratios.get('flops'), fmt='{:.4f}')
        if 'modules' in models[0][mode]:
            add(f'{mode} FLOPs share of /{models[0][mode]["modules"]["pattern"]}/ (%)',
                [100 * m[mode]['modules']['share'] for m in models], fmt='{:.3f}')
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = [f'{title}: {m["label"]}' for title, m in zip(header[1:], models)]
    lines += ['  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    settings = results['settings']
    env = results['environment']
    lines.append(f"device {settings['device']} ({env['device_name']}, {env['cpu_threads']} threads), "
                 f"batch {settings['batch_size']}, {settings['num_warm_iter']} warm-up steps, then "
                 f"{results['repeats']} repeats of {settings['num_bench_iter']} timed steps, "
                 f"amp {settings['amp_dtype'] or 'off'}, compile {settings['torchcompile'] or 'off'}, "
                 f"torch {env['torch']}, timm {env['timm']}; ratios are model / compare")
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-m', '--model', default='ait_small_patch4_32', help='registered timm model name')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='K=V',
                        help='keyword arguments for timm.create_model, e.g. gwl=False bottleneck=None')
    parser.add_argument('--compare', nargs='+', default=None, metavar='NAME_OR_K=V',
                        help='a second model: NAME [K=V ...], or K=V ... changes to the first model\'s arguments')
    parser.add_argument('--bench', default=None, choices=('inference', 'train', 'both'),
                        help='default: both, or train with --speed-modes')
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    parser.add_argument('--img-size', type=int, default=None,
                        help='input resolution (default: the model\'s); fixed-size models are built at it')
    parser.add_argument('--amp', action='store_true', help='mixed precision through torch.autocast')
    parser.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                        help='torch.compile the model with fullgraph=True (backend default: inductor)')
    parser.add_argument('--threads', type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 gives steadier times on a busy "
                             'machine')
    parser.add_argument('--num-warm-iter', type=int, default=3,
                        help='untimed steps before the first timed run of each model and mode')
    parser.add_argument('--num-bench-iter', type=int, default=10, help='timed steps per run')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per model and mode')
    parser.add_argument('--flops-modules', default=None, metavar='REGEX',
                        help="also report the inference FLOPs share of the modules whose name matches, "
                             "e.g. 'mlp\\.read$'")
    parser.add_argument('--speed-modes', nargs='+', default=None, metavar='MODE',
                        help="compare CPU speed settings: each MODE is tokens joined by '+' over the other flags, "
                             "fp32|bf16|fp16, cl (channels-last), tN (threads), compile (inductor), "
                             "e.g. fp32 bf16 cl t2 compile (step times only; --bench defaults to train)")
    parser.add_argument('--keep-freed-memory', action='store_true',
                        help='keep freed blocks under 32 MiB in the heap instead of handing them back to the kernel '
                             '(timm_ait.cpu_speed.keep_freed_memory), for the whole run')
    parser.add_argument('--epochs', nargs='*', default=None, metavar='CONFIG',
                        help='time whole training epochs instead of steps: pairs of train.py configs (an AiT\'s, '
                             f'then its twin\'s), or names of the registered CPU pairs {list(CPU_PAIRS)} (none '
                             'given: all of them, from --configs-dir)')
    parser.add_argument('--configs-dir', default=os.path.join('train_scripts', 'configs', 'cpu'),
                        help='where --epochs finds the registered CPU configs')
    parser.add_argument('--epoch-samples', type=int, default=None, metavar='N',
                        help="--epochs: train.py's --train-num-samples for each epoch (images; Sort-of-CLEVR asks 20 "
                             'questions an image) instead of the config\'s')
    parser.add_argument('--data-dir', default='data', help='--epochs: cache of the generated datasets')
    parser.add_argument('--profile', action='store_true',
                        help='also profile num_bench_iter steps of each model (with --epochs: one more epoch of each '
                             'config) with torch.profiler, and print where the time went by module (forward + '
                             'backward) and by operator, side by side')
    parser.add_argument('--results-file', default=None, help='write the results as JSON to this file')
    parser.add_argument('--json', action='store_true', help='print the results as JSON instead of a table')
    args = parser.parse_args(argv)
    for name in ('batch_size', 'num_bench_iter', 'repeats'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be >= 1')
    if args.img_size is not None and args.img_size < 1:
        parser.error(f'--img-size must be >= 1, got {args.img_size}')
    if args.num_warm_iter < 0:
        parser.error('--num-warm-iter must be >= 0')
    if not re.fullmatch(r'cpu|cuda(:[0-9]+)?', args.device):
        parser.error(f"--device {args.device!r}: expected 'cpu', 'cuda' or 'cuda:N' (the devices it can time)")
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device}: CUDA is not available')
    if args.flops_modules is not None:
        try:
            re.compile(args.flops_modules)
        except re.error as e:
            parser.error(f'--flops-modules {args.flops_modules!r}: expected a regular expression of module names, '
                         f'e.g. \'mlp\\.read$\' ({e})')
    if args.results_file and not os.path.isdir(os.path.dirname(os.path.abspath(args.results_file))):
        parser.error(f'--results-file {args.results_file!r}: expected a file in an existing folder')
    if args.speed_modes and len(set(args.speed_modes)) != len(args.speed_modes):
        parser.error(f'--speed-modes {" ".join(args.speed_modes)}: a mode is named twice')
    if args.profile and (args.speed_modes or args.torchcompile):
        parser.error('--profile marks modules by hooks on their eager forward: not with --speed-modes or --torchcompile')
    if args.bench is None:
        args.bench = 'train' if args.speed_modes else 'both'
    return parser, args


def epoch_pairs(names: Sequence[str], configs_dir: str) -> List[Tuple[str, str]]:
    """--epochs' arguments as (AiT config, twin config) paths."""
    if not names:
        names = list(CPU_PAIRS)
    if all(n in CPU_PAIRS for n in names):
        return [tuple(os.path.join(configs_dir, c) for c in CPU_PAIRS[n]) for n in names]
    if len(names) % 2 or any(n in CPU_PAIRS for n in names):
        raise ValueError(f'--epochs takes names of registered pairs {list(CPU_PAIRS)} or pairs of config files '
                         f'(an AiT\'s, then its twin\'s), got {list(names)}')
    return list(zip(names[::2], names[1::2]))


def main(argv=None):
    parser, args = parse_args(argv)
    if args.epochs is not None:
        try:
            results = time_epochs(epoch_pairs(args.epochs, args.configs_dir), args.repeats, args.data_dir,
                                  args.epoch_samples, profile=args.profile)
        except (ValueError, RuntimeError) as error:
            parser.exit(2, f'{parser.prog}: error: {error}\n')
        if args.results_file:
            with open(args.results_file, 'w') as f:
                json.dump(results, f, indent=2)
        text = format_epoch_table(results)
        for pair in results['pairs']:
            if 'profile' in pair:
                b = pair['profile']
                text += (f"\n\n{os.path.basename(pair['model'])} / {os.path.basename(pair['compare'])}: one epoch of "
                         f"{b[0]['steps']} steps each under the profiler\n\n"
                         + format_breakdown(b, ['AiT', 'twin'], 'modules', b[0]['steps'], top=30, min_ms=0.05) + '\n\n'
                         + format_breakdown(b, ['AiT', 'twin'], 'ops', b[0]['steps'], top=30, min_ms=0.05))
        print(json.dumps(results, indent=2) if args.json else text)
        return results
    specs = [ModelSpec(args.model, args.model_kwargs)]
    if args.compare:
        specs.append(compare_spec(args.compare, specs[0]))
    settings = BenchSettings(
        device=args.device, batch_size=args.batch_size, img_size=args.img_size,
        amp_dtype=args.amp_dtype if args.amp else None, channels_last=args.channels_last,
        torchcompile=args.torchcompile, num_warm_iter=args.num_warm_iter, num_bench_iter=args.num_bench_iter,
        threads=args.threads)
    modes = MODES if args.bench == 'both' else (args.bench,)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    if args.keep_freed_memory and not kept:
        print('--keep-freed-memory needs glibc; the allocator is left as it is', file=sys.stderr)
    try:
        if args.speed_modes:
            speed_modes = {name: parse_speed_mode(name, settings) for name in args.speed_modes}
            results = benchmark_speed_modes(specs, speed_modes, modes, args.repeats)
        else:
            results = benchmark(specs, settings, modes, args.repeats, args.flops_modules, profile=args.profile)
    except ValueError as error:
        parser.exit(2, f'{parser.prog}: error: {error}\n')
    results['environment']['keep_freed_memory'] = kept
    if args.results_file:
        with open(args.results_file, 'w') as f:
            json.dump(results, f, indent=2, default=repr)
    table = format_speed_table(results) if args.speed_modes else format_table(results)
    if 'profile' in results:
        table += '\n\n' + format_profiles(results['profile'], [m['label'] for m in results['models']])
    print(json.dumps(results, indent=2, default=repr) if args.json else table)


