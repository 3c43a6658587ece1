"""Target images: pictures that show the concept, which the attack pulls the unlearned model towards.

By default the base model renders them at the case's own seed and guidance; they are cached on
disk keyed by the base model's fingerprint, the prompt ids, seed, guidance and render settings.
Or the user gives a directory of images named by case number (``12.png`` or ``12_0.png``, the
reference code's layout).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Protocol

from ._paths import atomic_write_bytes, cache_dir
from .cases import Case
from .errors import UnlearnAtkError
from .models import LazyModel, LoadedModel
from .render import Renderer, RenderSettings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class TargetSource(Protocol):
    def __call__(self, case: Case, prompt_ids: list[int]) -> Any: ...


class DirectoryTargets:
    """Target images read from a directory, matched by case number."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UnlearnAtkError(f"target image directory {self.directory} does not exist")

    def path_for(self, case: Case) -> Path:
        for stem in (case.case_id, f"{case.case_id}_0"):
            for suffix in IMAGE_SUFFIXES:
                candidate = self.directory / f"{stem}{suffix}"
                if candidate.is_file():
                    return candidate
        raise UnlearnAtkError(
            f"no target image for case {case.case_id} in {self.directory}: expected "
            f"{case.case_id}.png or {case.case_id}_0.png (or .jpg/.webp)"
        )

    def __call__(self, case: Case, prompt_ids: list[int]) -> Any:
        from PIL import Image, UnidentifiedImageError

        path = self.path_for(case)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise UnlearnAtkError(f"target image {path} (case {case.case_id}) could not be read as an image "
                                  f"({error}); replace it with a PNG, JPEG or WebP file") from None


class RenderedTargets:
    """Targets rendered by the base model, cached as PNG files under ``<cache>/targets``.

    ``base`` may be a :class:`~pytest_unlearnatk.models.LazyModel`: it is loaded only on the first
    cache miss, so a run whose targets are all cached (a new checkpoint of the same base) keeps a
    single UNet in memory. Give ``settings`` with the image size filled in to keep it unloaded.
    """

    def __init__(self, base: LoadedModel | LazyModel, settings: RenderSettings, directory: Path | None = None) -> None:
        self.base = base
        if settings.height is None or settings.width is None:
            settings = settings.resolved(self._pipeline())
        self.settings = settings
        self.directory = directory or cache_dir() / "targets"
        self._renderer: Renderer | None = None  # built on the first cache miss

    def _pipeline(self) -> Any:
        return (self.base.load() if isinstance(self.base, LazyModel) else self.base).pipeline

    @functools.cached_property
    def _dtype(self) -> str:
        """The base's dtype as it loads (``auto`` resolved), without loading it."""
        if isinstance(self.base, LazyModel) and not self.base.is_loaded:
            from .models import select_device, select_dtype

            return select_dtype(self.base.dtype, select_device(self.base.device))
        return self.base.load().dtype if isinstance(self.base, LazyModel) else self.base.dtype

    def key(self, case: Case, prompt_ids: list[int]) -> str:
        material = {
            "base": self.base.fingerprint,
            "ids": prompt_ids,
            "seed": case.seed,
            "guidance": case.guidance,
            "render": self.settings.to_dict(),
            "dtype": self._dtype,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]

    def __call__(self, case: Case, prompt_ids: list[int]) -> Any:
        from PIL import Image

        path = self.directory / f"{self.key(case, prompt_ids)}.png"
        if path.is_file():
            try:
                with Image.open(path) as cached:
                    return cached.convert("RGB")
            except OSError:
                pass  # damaged cache file: render it again below
        if self._renderer is None:
            self._renderer = Renderer(self._pipeline(), self.settings, label=f"base model {self.base.source}")
        image = self._renderer.render(prompt_ids, case.seed, case.guidance)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as error:  # a cache that cannot be written costs a re-render next time, not the gate
            warnings.warn(f"target image cache {self.directory} could not be written ({error.strerror or error}); "
                          "set UNLEARNATK_CACHE_DIR to a writable directory to keep targets between runs", stacklevel=2)
        return image
