"""User-facing errors: one clear line naming the file and the problem."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input (a file, a folder, a checkpoint, an argument).

    ``str(err)`` is one line: ``"<path>: <problem>"`` (or just the problem when no
    path applies). The CLI prints that line and exits with status 2; no traceback.

    Args:
        path: the offending file or folder, or ``None``.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")
