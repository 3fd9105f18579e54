"""A full-weight CPU rank keeps the memory a step frees (icepop.trainer.lora.keep_freed_memory): a large
block freed stays resident for the next one, instead of going back to the kernel to be faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys, psutil, torch
from icepop.trainer.lora import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
rss = lambda: psutil.Process().memory_info().rss
before = rss()
block = torch.ones(256 * 2**20 // 4)  # 256 MiB, written: resident
del block
print((rss() - before) / 2**20)
"""


@pytest.mark.parametrize(("mode", "kept"), [("keep", True), ("default", False)])
def test_a_freed_block_stays_resident_only_when_kept(mode: str, kept: bool) -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    resident_after_free = float(result.stdout.strip().splitlines()[-1])
    assert (resident_after_free > 200) == kept, resident_after_free
