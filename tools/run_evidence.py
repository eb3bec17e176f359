#!/usr/bin/env python3
"""Run the evidence runs of docs/results.md one after another, each continuing exactly where it stopped.

    python tools/run_evidence.py                      # every run, in order (about 10 hours)
    python tools/run_evidence.py --runs triangle-ait  # one run
    python tools/run_evidence.py --dry-run            # print the commands only

For each run (a config under train_scripts/configs/cpu/ and a seed), in a fresh process with the CPU
environment (timm_ait.cpu_speed.CPU_TRAINING_ENV):

1. train.py: from scratch, or ``--resume`` from the run's last.pth.tar when an earlier invocation
   stopped part-way (train.py resumes exactly: weights, memory, optimizer, schedule, data order).
   A run already trained to its last epoch is not trained again. Each invocation is one part,
   recorded in the run folder's parts.json (first epoch, epochs done at its end, start and end time;
   a part killed outright has no end, and the next part's first epoch says where it stopped).
2. validate.py on the final weights (last.pth.tar, the end of the schedule; not the best epoch,
   which would be chosen on the test set) at batch size 1, on the test set the run evaluated,
   with the run's own data seed.
3. push_to_hub.py --local-dir: the Hub folder and its card (under --output/hub, not committed), so
   that the card is checked to render the run's measured numbers.
4. docs/results/<run>/: summary.csv, validate.json and run.json (command, seed, machine, parts,
   training time); and docs/results/<group>.png (plot_summary.py) from the runs of the group that
   have finished. A run that has not finished writes nothing there.

Stop it at any time (Ctrl-C, a session's end): the next invocation continues the run it was in.
Started in the background (``nohup ... &``), it ignores SIGINT as background jobs do; stop it with
``pkill -TERM -f run_evidence.py``, which does what Ctrl-C does (train.py stops, the part is recorded).
"""
import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from timm_ait.checkpoint import read_checkpoint
from timm_ait.cpu_speed import CPU_TRAINING_ENV
from timm_ait.layers._args import to_bool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = os.path.join('train_scripts', 'configs', 'cpu')
PAPER_TRIANGLE_TOP1 = 99.47  # AiT-Small, the AiT paper's Table 6


@dataclass(frozen=True)
class Run:
    name: str
    config: str  # file name under CONFIGS
    seed: int
    group: str
    label: str


@dataclass(frozen=True)
class Group:
    metrics: Tuple[str, ...]
    title: str
    references: Tuple[Tuple[float, str], ...] = ()


SOC = 'sort_of_clevr-ait_small_w256_patch15_75'
RUNS = (
    Run('triangle-ait', 'triangle-ait_small_patch32_64.yaml', 0, 'triangle', 'AiT-Small'),
    Run('triangle-vit', 'triangle-vit_small_patch32_64.yaml', 0, 'triangle', 'ViT twin'),
    Run('sort_of_clevr-ait-seed0', f'{SOC}.yaml', 0, 'sort_of_clevr', 'AiT, seed 0'),
    Run('sort_of_clevr-vit-seed0', 'sort_of_clevr-vit_small_w256_patch15_75.yaml', 0, 'sort_of_clevr',
        'ViT twin, seed 0'),
    Run('sort_of_clevr-ait-seed1', f'{SOC}.yaml', 1, 'sort_of_clevr', 'AiT, seed 1'),
    Run('sort_of_clevr-vit-seed1', 'sort_of_clevr-vit_small_w256_patch15_75.yaml', 1, 'sort_of_clevr',
        'ViT twin, seed 1'),
    Run('sort_of_clevr-no_bottleneck-seed0', f'{SOC}-no_bottleneck.yaml', 0, 'ablations', 'w/o bottleneck, seed 0'),
    Run('sort_of_clevr-no_hopfield-seed0', f'{SOC}-no_hopfield.yaml', 0, 'ablations', 'w/o Hopfield, seed 0'),
    # Sort-of-CLEVR: the decorrelating write at seeds 0-2, and seed 2 of the paper's write and of the twin
    Run('sort_of_clevr-ait-seed2', f'{SOC}.yaml', 2, 'sort_of_clevr', 'AiT, seed 2'),
    Run('sort_of_clevr-vit-seed2', 'sort_of_clevr-vit_small_w256_patch15_75.yaml', 2, 'sort_of_clevr',
        'ViT twin, seed 2'),
    *(Run(f'sort_of_clevr-decorrelation-seed{seed}', f'{SOC}-decorrelation.yaml', seed, 'sort_of_clevr',
          f'AiT, decorrelating write, seed {seed}') for seed in range(3)),
    # the memory write: the paper's, the decorrelating one and the ViT twin, seed by seed so that a partial
    # sweep has every arm at the same seeds
    *(Run(f'triangle_tiny-{arm}-seed{seed}', f'triangle_tiny-{config}.yaml', seed, 'triangle_tiny', f'{label}, seed {seed}')
      for seed in range(8)
      for arm, config, label in (('paper', 'ait_tiny_patch32_64', 'paper write'),
                                 ('decorrelation', 'ait_tiny_patch32_64-decorrelation', 'decorrelating write'),
                                 ('vit', 'vit_tiny_patch32_64', 'ViT twin'))),
)
GROUPS = {
    'triangle': Group(('eval_top1',), 'Triangle: AiT-Small and its ViT twin, same CPU recipe',
                      ((PAPER_TRIANGLE_TOP1, 'paper, AiT-Small'),)),
    'sort_of_clevr': Group(('eval_relational_top1', 'eval_non_relational_top1'),
                           'Sort-of-CLEVR (CPU-scale AiT, width 256, patch 15) and its ViT twin'),
    'triangle_tiny': Group(('eval_top1',), 'Triangle, tiny AiT at the demo budget: memory writes and the ViT twin'),
    # the full model's seed-0 run is drawn beside its ablations
    'ablations': Group(('eval_relational_top1', 'eval_non_relational_top1'),
                       'Sort-of-CLEVR ablations of the CPU-scale AiT, seed 0'),
}
ABLATION_BASELINE = 'sort_of_clevr-ait-seed0'


def run_dir(output: str, run: Run) -> str:
    return os.path.join(output, run.name)


def read_config(run: Run) -> Dict:
    with open(os.path.join(REPO, CONFIGS, run.config)) as f:
        return yaml.safe_load(f)


def total_epochs(run: Run, folder: str) -> int:
    """The run's epochs: as train.py recorded them (args.yaml) once it has started, else its config's."""
    recorded = os.path.join(folder, 'args.yaml')
    if os.path.isfile(recorded):
        with open(recorded) as f:
            config = yaml.safe_load(f)
    else:
        config = read_config(run)
    return int(config['epochs']) + int(config.get('cooldown_epochs') or 0)


def epochs_done(folder: str) -> int:
    """Epochs completed and saved in the run's last.pth.tar (0 without one)."""
    last = os.path.join(folder, 'last.pth.tar')
    if not os.path.isfile(last):
        return 0
    return int(read_checkpoint(last)['epoch']) + 1


def train_command(python: str, run: Run, output: str, data_dir: str, resume: bool,
                  extra: Sequence[str] = ()) -> List[str]:
    command = [python, os.path.join('train_scripts', 'train.py'), '-c', os.path.join(CONFIGS, run.config),
               '--seed', str(run.seed), '--data-dir', data_dir, '--output', output, '--experiment', run.name,
               *extra]
    if resume:
        command += ['--resume', os.path.join(output, run.name, 'last.pth.tar')]
    return command


def validate_command(python: str, run: Run, output: str, data_dir: str) -> List[str]:
    """validate.py on the run's final weights, on the test set it evaluated, from its own args.yaml."""
    folder = run_dir(output, run)
    with open(os.path.join(folder, 'args.yaml')) as f:
        args = yaml.safe_load(f)
    command = [python, os.path.join('train_scripts', 'validate.py'), '--model', args['model'],
               '--checkpoint', os.path.join(folder, 'last.pth.tar'), '--dataset', args['dataset'],
               '--data-dir', data_dir, '--split', args['val_split'], '--seed', str(args['seed']),
               '-b', '1', '-j', '0', '--results-file', os.path.join(folder, 'validate.json')]
    if args.get('val_num_samples') is not None:
        command += ['--num-samples', str(args['val_num_samples'])]
    if args['dataset'] == 'sort-of-clevr':
        command += ['--sort-of-clevr-questions', 'all']
    if to_bool('gwl', (args.get('model_kwargs') or {}).get('gwl', True)):
        command += ['--memory-swaps']  # does the model use what its memory holds?
    return command


def hub_command(python: str, run: Run, output: str) -> List[str]:
    folder = run_dir(output, run)
    return [python, os.path.join('train_scripts', 'push_to_hub.py'), os.path.join(folder, 'last.pth.tar'),
            '--results-file', os.path.join(folder, 'validate.json'),
            '--local-dir', os.path.join(output, 'hub', run.name), '--overwrite']


def machine() -> Dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return dict(host=socket.gethostname(), cpu=cpu, cores=os.cpu_count(), torch=torch.__version__,
                python=platform.python_version())


def shell(command: Sequence[str], env: Optional[Dict[str, str]] = None) -> str:
    exports = ' '.join(f'{k}={v}' for k, v in (env or {}).items())
    return (exports + ' ' if exports else '') + shlex.join(command)


def execute(command: Sequence[str], env: Dict[str, str], dry_run: bool) -> None:
    print(f'$ {shell(command, env)}', flush=True)
    if dry_run:
        return
    with subprocess.Popen(list(command), cwd=REPO, env={**os.environ, **env}) as process:
        try:
            returncode = process.wait()
        except BaseException:  # stopped (SIGTERM raises KeyboardInterrupt): kill the step and reap it, not a zombie
            process.kill()
            process.wait()
            raise
    if returncode:
        raise subprocess.CalledProcessError(returncode, list(command))


def train_run(run: Run, args, env: Dict[str, str]) -> bool:
    """Train ``run`` to its last epoch, in as many parts as it takes; True once it has finished."""
    folder = run_dir(args.output, run)
    epochs = total_epochs(run, folder)
    done = epochs_done(folder)
    if done >= epochs:
        print(f'== {run.name}: trained ({done} of {epochs} epochs)', flush=True)
        return True
    command = train_command(args.python, run, args.output, args.data_dir, resume=done > 0, extra=args.train_args)
    print(f'== {run.name}: ' + (f'resuming after epoch {done}' if done else 'starting'), flush=True)
    if args.dry_run:
        execute(command, env, dry_run=True)
        return False
    parts_file = os.path.join(folder, 'parts.json')
    parts = []
    if os.path.isfile(parts_file):
        with open(parts_file) as f:
            parts = json.load(f)
    part = dict(first_epoch=done, command=shell(command, env), started=time.strftime('%Y-%m-%d %H:%M:%S %z'),
                machine=machine(), ended=None, epochs_done=None)
    os.makedirs(folder, exist_ok=True)

    def record(part):
        with open(parts_file, 'w') as f:
            json.dump(parts + [part], f, indent=2)

    record(part)  # a part killed outright stays on record, with no end
    try:
        execute(command, env, dry_run=False)
    finally:
        # also when stopped: the next part starts where this one left its last checkpoint
        record(dict(part, epochs_done=epochs_done(folder), ended=time.strftime('%Y-%m-%d %H:%M:%S %z')))
    if epochs_done(folder) < total_epochs(run, folder):
        raise RuntimeError(f'{run.name}: train.py ended at epoch {epochs_done(folder)} of {total_epochs(run, folder)}')
    return True


def newer(target: str, source: str) -> bool:
    return os.path.isfile(target) and os.path.getmtime(target) >= os.path.getmtime(source)


def publish_results(run: Run, args, env: Dict[str, str]) -> None:
    """validate.py and the Hub card of a finished run (once), then its files under --results-dir."""
    folder = run_dir(args.output, run)
    last = os.path.join(folder, 'last.pth.tar')
    if args.dry_run or not newer(os.path.join(folder, 'validate.json'), last):
        execute(validate_command(args.python, run, args.output, args.data_dir), env, args.dry_run)
    if not args.no_hub_card and (args.dry_run or not newer(os.path.join(args.output, 'hub', run.name, 'README.md'),
                                                           os.path.join(folder, 'validate.json'))):
        execute(hub_command(args.python, run, args.output), env, args.dry_run)
    if args.dry_run:
        return
    out = os.path.join(args.results_dir, run.name)
    os.makedirs(out, exist_ok=True)
    for name in ('summary.csv', 'validate.json'):
        shutil.copyfile(os.path.join(folder, name), os.path.join(out, name))
    with open(os.path.join(folder, 'parts.json')) as f:
        parts = json.load(f)
    with open(os.path.join(folder, 'summary.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    record = dict(
        run=run.name, config=os.path.join(CONFIGS, run.config), seed=run.seed,
        command=f'python tools/run_evidence.py --runs {run.name}',
        epochs=len(rows), train_time_s=round(sum(float(r.get('train_time_s') or 0) for r in rows), 1),
        parts=parts, environment=env)
    with open(os.path.join(out, 'run.json'), 'w') as f:
        json.dump(record, f, indent=2)


def plot_group(group: str, args) -> None:
    # every finished run of the group, not only those of this call: a run done in an earlier call stays drawn
    members = [r for r in RUNS if r.group == group]
    if group == 'ablations':
        members = [r for r in RUNS if r.name == ABLATION_BASELINE] + members
    finished = [r for r in members if os.path.isfile(os.path.join(args.results_dir, r.name, 'summary.csv'))]
    if not finished or args.dry_run:
        return
    spec = GROUPS[group]
    command = [args.python, os.path.join('tools', 'plot_summary.py'),
               *[os.path.join(args.results_dir, r.name, 'summary.csv') for r in finished],
               '--labels', *[r.label for r in finished], '--metrics', *spec.metrics, '--title', spec.title,
               '-o', os.path.join(args.results_dir, f'{group}.png')]
    for value, text in spec.references:
        command += ['--reference', str(value), text]
    execute(command, {}, dry_run=False)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--runs', nargs='+', default=None, metavar='NAME',
                        help=f'runs to do, in this order (default: all): {", ".join(r.name for r in RUNS)}')
    parser.add_argument('--output', default=os.path.join('output', 'evidence'), help='run folders (checkpoints)')
    parser.add_argument('--data-dir', default='data', help='cache of the generated datasets')
    parser.add_argument('--results-dir', default=os.path.join('docs', 'results'),
                        help='where summary.csv, validate.json, run.json and the PNGs go')
    parser.add_argument('--python', default=sys.executable)
    parser.add_argument('--no-hub-card', action='store_true', help='skip the push_to_hub.py --local-dir check')
    parser.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
    parser.add_argument('--train-args', nargs=argparse.REMAINDER, default=[],
                        help='more train.py flags after the config, to the end of the command line (a smoke test '
                             'at tiny size; such runs are not the evidence runs)')
    args = parser.parse_args(argv)
    names = [r.name for r in RUNS]
    for name in args.runs or ():
        if name not in names:
            parser.error(f'unknown run {name!r}; the runs are {names}')
    return args


def _stop_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt(f'stopped by signal {signum}')


def main(argv=None) -> None:
    args = parse_args(argv)
    # a background job ignores SIGINT; SIGTERM then stops it as Ctrl-C would: subprocess.run kills
    # train.py (which resumes from its last checkpoint) and train_run records the part with its end
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    runs = [r for r in RUNS if args.runs is None or r.name in args.runs]
    env = dict(CPU_TRAINING_ENV)
    for run in runs:
        try:
            if train_run(run, args, env):
                publish_results(run, args, env)
        except (KeyboardInterrupt, subprocess.CalledProcessError) as e:
            sys.exit(stopped_message(run, args, e))
        # now, not after the last run of the call: stopping a later run must not leave this one undrawn
        plot_group(run.group, args)


def stopped_message(run: Run, args, error: BaseException) -> str:
    """One line for a run stopped by a signal (to itself or to train.py) or failed in a step, not a traceback."""
    folder = run_dir(args.output, run)
    where = f'at epoch {epochs_done(folder)} of {total_epochs(run, folder)}'
    if isinstance(error, subprocess.CalledProcessError) and error.returncode > 0:
        return (f'== {run.name}: stopped {where}: {os.path.basename(error.cmd[1])} failed with exit status '
                f'{error.returncode} (its output is above)')
    cause = (f'{os.path.basename(error.cmd[1])} died with {signal.Signals(-error.returncode).name}'
             if isinstance(error, subprocess.CalledProcessError) else str(error) or 'interrupted')
    return f'== {run.name}: stopped {where} ({cause}); the same command resumes it from its last checkpoint'


if __name__ == '__main__':
    main()
