"""The one kind of error a user's input causes: `InputError`, reported as one line without a traceback
(icepop.train), as opposed to a bug, whose traceback is what a report needs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class InputError(ValueError):
    """A setting, model, dataset or reward function that cannot work; the message names the setting or
    the row, the bad value and what would be right."""


@contextlib.contextmanager
def input_errors(what: str) -> Iterator[None]:
    """Re-raise a ValueError/OSError/ImportError/TypeError from loading `what` (e.g. "the data
    of data.source='x.jsonl'") as an InputError: such errors there are the input's, not icepop's."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, OSError, ImportError, TypeError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        raise InputError(f"{what}: {' '.join(lines[:3])}") from error


class RunStopped(RuntimeError):
    """The run cannot go on (a trainer rank died, too many non-finite steps, engines keep dying); the
    message says why and which checkpoint to resume from."""
