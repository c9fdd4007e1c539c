"""Progress bars that a user can silence.

tqdm (4.66 and newer) reads `TQDM_DISABLE=1` (and every other `TQDM_*` option) from the
environment, but only for arguments the caller does not pass: a bar built with an explicit
`disable=False` can never be silenced. So bars pass `disable=True` only where they must be
off (a process other than the main one, or show_progress=False) and otherwise leave it to tqdm.
"""

from __future__ import annotations

from typing import Any


def progress_kwargs(show: bool) -> dict[str, Any]:
    """tqdm keyword arguments for a bar that should show (unless TQDM_DISABLE) or not."""
    return {} if show else {"disable": True}
