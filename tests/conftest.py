"""Fixtures shared by the data tests."""

from __future__ import annotations

from typing import Any

import pytest

from icepop.models.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The tiny chat tokenizer (a chat template, EOS and PAD tokens), built offline."""
    return build_tokenizer()
