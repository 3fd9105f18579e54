"""Start-up checks: a CPU torch beside PyPI's CUDA torchvision (what `pip install 'icepop[cpu]'` gives
outside the Makefile) stops `python -m icepop.train` with one line naming what to uninstall."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from icepop.preflight import broken_vision_packages, check_install


def test_cpu_torch_with_cuda_builds_beside_it_is_named() -> None:
    installed = {"torchvision": "0.28.0", "torchaudio": "2.13.0+cpu", "torchcodec": "0.9.1"}
    assert broken_vision_packages("2.13.0+cpu", installed) == ["torchcodec", "torchvision"]
    assert broken_vision_packages("2.13.0+cpu", {"torchvision": "0.28.0+cpu"}) == []
    assert broken_vision_packages("2.13.0", installed) == []  # a CUDA torch takes CUDA companions


def test_this_environment_passes() -> None:
    assert check_install() is None


def fake_distribution(site: Path, name: str, version: str) -> None:
    """A dist-info folder: what `importlib.metadata` sees of an installed distribution."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_train_refuses_to_start_with_a_cuda_torchvision(tmp_path: Path) -> None:
    fake_distribution(tmp_path / "site", "torchvision", "0.28.0")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run(
        [sys.executable, "-m", "icepop.train", "+recipe=rlvr", f"run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "pip uninstall -y torchvision" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
