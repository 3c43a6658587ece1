"""Content fingerprints of weight files, cached so the same file is hashed once.

A fingerprint is a SHA-256 over file contents. The cache maps (absolute path, size, mtime) to the
file's hash and lives in ``<cache_dir>/file-hashes.json``; a changed file gets a new entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ._paths import atomic_write_bytes, cache_dir

_CHUNK = 1 << 20


def _cache_file() -> Path:
    return cache_dir() / "file-hashes.json"


def _read_cache() -> dict[str, dict]:
    try:
        return json.loads(_cache_file().read_text("utf-8"))
    except (OSError, ValueError):
        return {}  # missing or damaged cache: hash again, nothing is lost


def file_sha256(path: str | Path) -> str:
    """SHA-256 of one file's bytes, looked up in the on-disk cache first."""
    real = Path(path).resolve()
    stat = real.stat()
    key = str(real)
    cache = _read_cache()
    entry = cache.get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    try:
        from filelock import FileLock

        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        # read-modify-write of a file other processes (xdist workers) update too
        with FileLock(str(_cache_file()) + ".lock", timeout=60):
            cache = _read_cache()
            cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
            atomic_write_bytes(_cache_file(), json.dumps(cache, sort_keys=True, indent=0).encode("utf-8"))
    except OSError:
        pass  # a read-only or busy cache only costs speed
    return digest.hexdigest()


def directory_fingerprint(directory: str | Path) -> str:
    """Fingerprint of every (non-hidden) file below ``directory``: names and contents."""
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        digest.update(f"{relative}:{file_sha256(path)}\n".encode("utf-8"))
    return digest.hexdigest()


def combine(*parts: str) -> str:
    """A fingerprint derived from several others (e.g. a base pipeline plus a weights file)."""
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()
