"""Shared by the tests: where the repository is, and how a script of it is run in a fresh interpreter."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(path, *args, check=True, timeout=600, env=None, cwd=None):
    """``python PATH ARGS`` in a fresh interpreter, its output captured; an AssertionError showing both if it fails."""
    proc = subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f'{path} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
    return proc


@pytest.fixture(scope='session')
def repo():
    return REPO
