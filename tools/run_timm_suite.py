#!/usr/bin/env python3
"""Run timm's own model tests (``tests/test_models.py`` of timm's sdist) on timm_ait's models.

    python tools/run_timm_suite.py                 # every image-only model timm_ait registers
    python tools/run_timm_suite.py --smallest      # the smallest model of each family
    python tools/run_timm_suite.py -- -k fx -x     # anything after -- goes to pytest

The sdist of the installed timm version is fetched once with ``pip download`` into
``.cache/timm-sdist/`` (git-ignored); its ``tests/test_models.py`` is copied to
``.cache/timm-suite/<version>/`` with the suite's lists extended as a pull request adding these
models to timm would extend them: ``ait_*`` joins ``NON_STD_FILTERS`` (ViT-like: no spatial
feature map from ``forward_features``; ``hmixer_*`` is already there as ``*mixer_*``), and the
modules ``ait``, ``ait_tiny`` and ``paramixer`` join ``FEAT_INTER_FILTERS`` (they have
``forward_intermediates`` and ``features_only`` through timm's ``FeatureGetterNet``). No model goes
into any ``EXCLUDE_*`` list.

The run imports ``timm_ait`` before the suite is collected, so its models are registered, and
restricts the suite to the selected models: ``list_models`` / ``list_pretrained`` return only them,
and tests of timm's own models (fixed names) are deselected. Also deselected: the two tests that
download published weights (``test_model_load_pretrained``, ``test_model_features_pretrained``):
no weights are published yet and tests have no Hub to reach. The question-answering models
(``ait_*_patch5_75``, ``forward(images, questions)``) cannot run a one-input suite; the project's
own tests check them (tests/test_deployment.py).
"""
import argparse
import fnmatch
import os
import re
import subprocess
import sys
import tarfile
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, '.cache')

# the lines a pull request adding these models to timm would add, inserted before ANCHOR
ANCHOR = 'NUM_NON_STD = len(NON_STD_FILTERS)'
LIST_ADDITIONS = (
    "# timm_ait (tools/run_timm_suite.py): the lists as a pull request adding these models would extend them\n"
    "FEAT_INTER_FILTERS += ['ait', 'ait_tiny', 'paramixer']\n"
    "NON_STD_FILTERS += ['ait_*']\n"
)
# modules whose models take (images, questions): outside a suite that feeds one image tensor
TWO_INPUT_MODULES = ('timm_ait.models.ait_relational',)
# need published weights and a Hub to download them from
NEEDS_PUBLISHED_WEIGHTS = ('test_model_load_pretrained', 'test_model_features_pretrained')
# a family is a model module, and in the hmixer module a block type (each has its own code path)
_SIZE = re.compile(r'_(?:tiny|small|medium|base|[sb]\d+)(?:_|$)')


def fetch_test_file(version: str) -> str:
    """Path of the sdist's tests/test_models.py, downloading the sdist on first use."""
    sdist_dir = os.path.join(CACHE, 'timm-sdist')
    tests = os.path.join(sdist_dir, f'timm-{version}', 'tests', 'test_models.py')
    if os.path.exists(tests):
        return tests
    archive = os.path.join(sdist_dir, f'timm-{version}.tar.gz')
    if not os.path.exists(archive):
        cmd = [sys.executable, '-m', 'pip', 'download', '--no-binary', ':all:', '--no-deps', '--quiet',
               f'timm=={version}', '-d', sdist_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(archive):
            raise RuntimeError(f'could not download the sdist of timm {version} ({" ".join(cmd)}):\n'
                               f'{proc.stdout}{proc.stderr}')
    member = f'timm-{version}/tests/test_models.py'
    with tarfile.open(archive) as tar:
        safe = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}  # Python 3.12+, and 3.9-3.11 updates
        tar.extractall(sdist_dir, members=[tar.getmember(member)], **safe)
    return tests


def write_suite(version: str) -> str:
    """The suite's directory: test_models.py with the lists extended, and a pytest.ini."""
    with open(fetch_test_file(version)) as f:
        source = f.read()
    if source.count(ANCHOR) != 1 or 'FEAT_INTER_FILTERS = [' not in source:
        raise RuntimeError(f"timm {version}'s tests/test_models.py no longer has the line {ANCHOR!r} after "
                           'FEAT_INTER_FILTERS and NON_STD_FILTERS: update LIST_ADDITIONS in tools/run_timm_suite.py')
    suite_dir = os.path.join(CACHE, 'timm-suite', version)
    os.makedirs(suite_dir, exist_ok=True)
    with open(os.path.join(suite_dir, 'test_models.py'), 'w') as f:
        f.write(source.replace(ANCHOR, LIST_ADDITIONS + ANCHOR))
    with open(os.path.join(suite_dir, 'pytest.ini'), 'w') as f:
        # timm's markers (its pyproject.toml lists them); timeout needs pytest-timeout, absent here
        f.write('[pytest]\nmarkers =\n' + ''.join(
            f'    {m}\n' for m in ('base', 'cfg', 'cfg_nonstd', 'forward', 'backward', 'torchscript', 'features',
                                   'fxforward', 'fxbackward', 'timeout')))
    return suite_dir


def image_models() -> List[str]:
    """Every model timm_ait registers that takes one image tensor."""
    import timm
    import timm_ait  # noqa: F401  (registers the models)
    from timm.models import model_entrypoint
    names = []
    for name in timm.list_models():
        module = model_entrypoint(name).__module__
        if module.startswith('timm_ait.') and module not in TWO_INPUT_MODULES:
            names.append(name)
    return names


def family(name: str) -> str:
    """'ait' for ait_small_patch4_32, 'hmixer_serial' for hmixer_serial_s4_32, by module."""
    from timm.models import model_entrypoint
    return model_entrypoint(name).__module__ + ':' + _SIZE.split(name, maxsplit=1)[0]


def num_params(name: str) -> int:
    import timm
    import torch
    with torch.device('meta'):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


def smallest_of_each_family(names: List[str]) -> List[str]:
    best: Dict[str, tuple] = {}
    for name in names:
        key = (num_params(name), name)
        best[family(name)] = min(best.get(family(name), key), key)
    return sorted(name for _, name in best.values())


class RestrictToModels:
    """pytest plugin: the suite sees only ``models`` (with any pretrained tag)."""

    def __init__(self, models: List[str]):
        self.models = set(models)

    def _ours(self, name) -> bool:
        return isinstance(name, str) and name.split('.')[0] in self.models

    def pytest_configure(self, config):
        import timm
        list_models, list_pretrained = timm.list_models, timm.list_pretrained
        # test_models.py binds these at import, which comes after this hook
        timm.list_models = lambda *a, **kw: [m for m in list_models(*a, **kw) if self._ours(m)]
        timm.list_pretrained = lambda *a, **kw: [m for m in list_pretrained(*a, **kw) if self._ours(m)]

    def pytest_collection_modifyitems(self, config, items):
        keep, drop = [], []
        for item in items:
            params = getattr(getattr(item, 'callspec', None), 'params', {})
            ours = self._ours(params.get('model_name'))
            (keep if ours and item.originalname not in NEEDS_PUBLISHED_WEIGHTS else drop).append(item)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--smallest', action='store_true', help='only the smallest model of each family')
    parser.add_argument('--models', nargs='+', default=None, metavar='PATTERN',
                        help='only the image models matching these fnmatch patterns')
    parser.add_argument('--list', action='store_true', help='print the selected models and exit')
    parser.add_argument('pytest_args', nargs='*', help='after --: arguments for pytest')
    args = parser.parse_args(argv)

    import pytest
    import timm
    models = image_models()
    if args.models:
        models = [m for m in models if any(fnmatch.fnmatch(m, p) for p in args.models)]
    if args.smallest:
        models = smallest_of_each_family(models)
    if not models:
        parser.error('no model selected')
    if args.list:
        print('\n'.join(models))
        return 0
    suite_dir = write_suite(timm.__version__)
    print(f"timm {timm.__version__}'s tests/test_models.py on {len(models)} timm_ait models: {' '.join(models)}",
          flush=True)
    return int(pytest.main(
        [os.path.join(suite_dir, 'test_models.py'), '--rootdir', suite_dir, '-c', os.path.join(suite_dir, 'pytest.ini'),
         '-p', 'no:cacheprovider', *args.pytest_args],
        plugins=[RestrictToModels(models)]))


if __name__ == '__main__':
    sys.exit(main())
