"""timm's own model tests (tests/test_models.py of the installed timm's sdist) on timm_ait's models.

tools/run_timm_suite.py fetches the sdist once into .cache/, extends the suite's lists as a pull request
adding these models to timm would, and runs it on timm_ait's image models: here the smallest model of each
family, to keep `make test` short; `make test-timm` runs every model.
"""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_timm_model_suite_passes_on_the_smallest_model_of_each_family():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, 'tools', 'run_timm_suite.py'), '--smallest', '--', '-q', '-p', 'no:randomly'],
        capture_output=True, text=True, cwd=REPO)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ''
    assert proc.returncode == 0, f'timm suite failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}'
    passed = re.search(r'(\d+) passed', summary)
    assert passed and int(passed.group(1)) >= 6 * 9 and 'failed' not in summary, summary
