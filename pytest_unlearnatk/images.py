"""Image files of a gate: where the plain and adversarial image of every case are written."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from .errors import SettingProblem


def safe_name(text: str, fallback: str = "gate") -> str:
    """``text`` as one file-name component that stays inside its directory: only letters, digits,
    ``_.-``, no leading dot, at most 120 characters. Where that changed ``text``, a short hash of
    it is added, so two names that differ (``nudity v1``, ``nudity/v1``) never share a file."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")[:100]
    if cleaned == text and cleaned:
        return cleaned
    return f"{cleaned or fallback}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"


class ImageFiles:
    """A directory of case images: ``<case id>_<kind>.png`` (kind: ``plain`` or ``adversarial``)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def save(self, image: Any, case_id: str, kind: str) -> str:
        """Write ``image`` (a PIL image) and return its path."""
        path = self.directory / f"{safe_name(case_id, 'case')}_{kind}.png"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            image.save(path)
        except OSError as error:
            raise report_problem(self.directory, error) from None
        return str(path)


def report_problem(directory: Path, error: OSError) -> SettingProblem:
    """A report directory that cannot be written, said in terms of the setting that names it."""
    return SettingProblem("report", f"could not write the report in {directory} ({error.strerror or error})",
                          "DIR, a writable directory")
