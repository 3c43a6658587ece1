"""Where the project keeps caches on disk."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS_DIR / "clip_tokenizer"


def cache_dir() -> Path:
    """``$UNLEARNATK_CACHE_DIR``, else ``$XDG_CACHE_HOME/pytest-unlearnatk``, else ``~/.cache/pytest-unlearnatk``."""
    explicit = os.environ.get("UNLEARNATK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pytest-unlearnatk"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves no half-written temp file behind
        raise


def ensure_writable_dir(directory: Path) -> None:
    """Create ``directory`` and write (and drop) a probe file in it; OSError says why it cannot be
    written. For settings that name a directory, checked before any work that would write there."""
    import tempfile

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
        pass
