"""The test suite's own arrangement: under `make test` (pytest -n 2 --dist loadgroup) the `ray` tests of
one group run one after another on one worker, so at most two Ray clusters (one per group) run at once,
and the other `slow` tests (engines, process groups) share one worker too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")


def test_each_group_of_slow_tests_runs_on_one_worker_under_make_test(tmp_path: Path) -> None:
    # A throwaway suite that takes this suite's grouping hook: four tests that start Ray in the default
    # group, four in the second, four other slow ones and four fast ones, each writing down its worker.
    (tmp_path / "conftest.py").write_text(
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(CONFTEST.parent)!r})\n"
        f"spec = importlib.util.spec_from_file_location('icepop_tests_conftest', {str(CONFTEST)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "pytest_itemcollected = module.pytest_itemcollected\n"
    )
    (tmp_path / "test_probe.py").write_text(
        "import os, pathlib, time, pytest\n"
        "SLOW = pytest.param('slow', marks=pytest.mark.slow)\n"
        "RAY = pytest.param('ray', marks=[pytest.mark.slow, pytest.mark.ray])\n"
        "APART = pytest.param('apart', marks=[pytest.mark.slow, pytest.mark.ray('apart')])\n"
        "@pytest.mark.parametrize('kind', [RAY] * 4 + [APART] * 4 + [SLOW] * 4 + ['fast'] * 4)\n"
        "@pytest.mark.parametrize('i', [0, 1])\n"
        "def test_probe(kind, i, request):\n"
        "    time.sleep(0.2)\n"
        "    worker = os.environ['PYTEST_XDIST_WORKER']\n"
        "    pathlib.Path(request.node.name + '.worker').write_text(worker + kind)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider", "-q",
         "-o", "markers=slow: slow\nray: ray", "-o", "addopts=", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = [p.read_text() for p in tmp_path.glob("*.worker")]
    assert len(ran) == 32, ran
    for kind in ("ray", "apart", "slow"):
        assert len({r.removesuffix(kind) for r in ran if r.endswith(kind)}) == 1, (kind, ran)
