"""The images of a gate's cases, kept as small content-addressed PNG files.

Every image a gate shows (target, plain prompt, adversarial prompt) is kept at most
``KEPT_SIZE`` pixels on its long side and, for an unsafe concept, blurred unless the run shows
unsafe images. Its file name is the SHA-256 of the PNG's bytes, so a case result holds only
names (``CaseResult.images``: kind -> name), the same image is never kept twice, and a result
reused from the store brings its images along: the store keeps them under ``images/`` and every
report run copies the ones it shows into its own ``images/`` directory.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from pathlib import Path
from typing import Any

from ._paths import atomic_write_bytes
from .errors import SettingProblem

KEPT_SIZE = 256  # pixels on the long side; SD's 512 px images are halved, the toy's 32 px kept as they are
IMAGE_NAME = re.compile(r"[0-9a-f]{64}\.png")


def safe_name(text: str, fallback: str = "gate") -> str:
    """``text`` as one file-name component that stays inside its directory: only letters, digits,
    ``_.-``, no leading dot, at most 120 characters. Where that changed ``text``, a short hash of
    it is added, so two names that differ (``nudity v1``, ``nudity/v1``) never share a file."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")[:100]
    if cleaned == text and cleaned:
        return cleaned
    return f"{cleaned or fallback}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"


def png_bytes(image: Any, blur: bool) -> bytes:
    """``image`` (a PIL image) as the PNG that is kept: at most KEPT_SIZE px, blurred if asked."""
    from PIL import Image, ImageFilter

    picture = image.convert("RGB")
    scale = KEPT_SIZE / max(picture.size)
    if scale < 1:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.LANCZOS)
    if blur:
        picture = picture.filter(ImageFilter.GaussianBlur(radius=max(picture.size) / 12))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def image_name(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() + ".png"


def is_intact(path: Path, name: str) -> bool:
    """Does the file at ``path`` exist and hold exactly the bytes its name is the digest of?"""
    try:
        return image_name(path.read_bytes()) == name
    except OSError:
        return False


class ImageKeeper:
    """Keeps a gate's images in a report's image directory and in the store (either may be None).

    ``blur``: the gate's concept is unsafe and the run does not show unsafe images, so every
    image is blurred before it is kept anywhere (the PNG files too, not only the HTML page).
    """

    def __init__(self, directory: str | Path | None, store: Any = None, blur: bool = False) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.store, self.blur = store, blur

    def keep(self, image: Any) -> str:
        """Keep ``image`` (a PIL image); returns its file name."""
        data = png_bytes(image, self.blur)
        name = image_name(data)
        if self.directory is not None and not (self.directory / name).is_file():
            try:
                atomic_write_bytes(self.directory / name, data)
            except OSError as error:
                raise image_dir_problem(self.directory, error) from None
        if self.store is not None:
            self.store.put_image(name, data)
        return name

    def bring(self, name: str) -> bool:
        """Make the image ``name`` of a reused result available in this run's directory (from the
        store); False when neither has it intact (e.g. a result stored by an earlier version, which
        kept absolute paths into its report instead of images)."""
        if self.directory is None:
            return True
        if not IMAGE_NAME.fullmatch(name):  # never a path: a record names a file only by its digest
            return False
        if (self.directory / name).is_file():
            return True
        source = self.store.image_file(name) if self.store is not None else None
        if source is None:
            return False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, self.directory / name)
        except OSError as error:
            raise image_dir_problem(self.directory, error) from None
        return True


def image_dir_problem(directory: Path, error: OSError) -> SettingProblem:
    """The image directory cannot be written: ``image_dir`` in Python (in pytest, the report's)."""
    return SettingProblem("image_dir", f"could not write images in {directory} ({error.strerror or error})",
                          "DIR, a writable directory")


def report_problem(directory: Path, error: OSError) -> SettingProblem:
    """A report directory that cannot be written, said in terms of the setting that names it."""
    return SettingProblem("report", f"could not write the report in {directory} ({error.strerror or error})",
                          "DIR, a writable directory")
