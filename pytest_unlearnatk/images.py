"""Image files of a gate: where the plain and adversarial image of every case are written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def safe_name(text: str, fallback: str = "gate") -> str:
    """``text`` as one file-name component: no path separators, no ``..``, at most 120 characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")[:120] or fallback


class ImageFiles:
    """A directory of case images: ``<case id>_<kind>.png`` (kind: ``plain`` or ``adversarial``)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def save(self, image: Any, case_id: str, kind: str) -> str:
        """Write ``image`` (a PIL image) and return its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{safe_name(case_id, 'case')}_{kind}.png"
        image.save(path)
        return str(path)
