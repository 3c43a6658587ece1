"""Load the pipelines under test: a diffusers directory, a hub id, an original single-file
checkpoint, or a weights / LoRA file over a base (the formats: :mod:`pytest_unlearnatk.formats`).

Everything here is strict. A weights file whose keys do not match the component it is meant for
fails with the numbers of missing and unexpected keys and a few examples; nothing loads partially.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fingerprint as fp
from .errors import SettingProblem, UnlearnAtkError
from .formats import LDM_UNET_PREFIX, DetectedFormat, detect, key_shapes
from .options import parse_device, parse_dtype, parse_lora_scale

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
COMPONENTS = ("unet", "text_encoder")
# Groups of an original (CompVis) Stable Diffusion checkpoint that are not the UNet.
LDM_OTHER_PREFIXES = ("first_stage_model.", "cond_stage_model.", "model_ema.")
LDM_SCHEDULE_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model.diffusion_model.betas",
}
# Constant buffers older transformers versions saved; they hold no learned weights.
IGNORED_BUFFER_KEYS = {"embeddings.position_ids"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A pipeline ready to attack or render, with where it came from and what it is."""

    pipeline: Any  # diffusers StableDiffusionPipeline
    source: str
    fingerprint: str
    device: str
    dtype: str
    base: str | None = None  # the base pipeline a weights file was applied over
    component: str | None = None  # which component the weights file replaced ("lora" for an adapter)
    description: str = ""  # what was loaded, in one line (the report shows it)

    @property
    def name(self) -> str:
        return Path(self.source).name or self.source


def select_device(requested: str | None = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; an explicit device is checked."""
    import torch

    try:
        requested = parse_device(requested)
    except ValueError as error:
        raise UnlearnAtkError(f"unknown device {requested!r}: {error}") from None
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UnlearnAtkError(f"device {requested!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'")
    return requested


def worker_device(requested: str | None, worker_index: int | None, visible_gpus: int) -> str:
    """The device of xdist worker ``worker_index``: worker i of n takes GPU i modulo the visible GPUs.

    Only ``auto`` and ``cuda`` are spread; an explicit ``cuda:N`` or ``cpu`` is kept. The GPUs
    counted are those CUDA_VISIBLE_DEVICES leaves visible, so ``cuda:i`` is the i-th of those.
    """
    requested = (requested or "auto").strip()
    if worker_index is None or visible_gpus < 1 or requested not in ("auto", "cuda"):
        return requested
    return f"cuda:{worker_index % visible_gpus}"


def select_dtype(requested: str | None, device: str) -> str:
    """``auto`` -> float16 on a GPU, float32 on the CPU. Names: float32/fp32, float16/fp16, bfloat16/bf16."""
    try:
        dtype = parse_dtype(requested)
    except ValueError as error:
        raise UnlearnAtkError(f"unknown dtype {requested!r}: {error}") from None
    if dtype == "auto":
        return "float32" if device == "cpu" else "float16"
    if dtype == "float16" and device == "cpu":
        raise UnlearnAtkError("float16 is not supported on the CPU; use float32 or bfloat16 there (or dtype='auto')")
    return dtype


def load_pipeline(
    source: str | Path,
    *,
    base: str | Path | LoadedModel | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    component: str | None = None,
    lora_scale: float | None = None,
) -> LoadedModel:
    """Load a Stable-Diffusion-style pipeline.

    ``source`` is a diffusers pipeline directory (``save_pretrained`` layout), a hub id, an
    original single-file checkpoint (UNet, VAE and text encoder; read with the configs of
    ``base`` or of the folder it is in), a UNet / text-encoder weights file or a LoRA file
    (``.safetensors``, ``.pt``, ``.bin``, ``.ckpt``) which is then applied over ``base``, or a name
    a registered model source knows (``toy:erased``; see :mod:`pytest_unlearnatk.registry`), whose
    own base is the default ``base``. ``base`` may itself be a directory, a hub id or a single-file
    checkpoint. ``component`` forces ``unet`` or ``text_encoder`` for a weights file (by default it
    is told from the keys). ``lora_scale`` (default 1) scales a LoRA file's update; any other
    value is an error for a model that is not a LoRA file.
    """
    base_name = base.source if isinstance(base, LoadedModel) else (None if base is None else str(base))
    plan = plan_model(str(source), base_name, lora_scale)
    device = select_device(device)
    dtype = select_dtype(dtype, device)
    pipeline, replaced = _build(plan, dtype, component)
    pipeline.to(device)
    return LoadedModel(pipeline=pipeline, source=plan.name, fingerprint=plan.fingerprint, device=device, dtype=dtype,
                       base=None if plan.kind == "directory" else plan.shown_base,
                       component=replaced, description=plan.description)


def model_fingerprint(source: str | Path, base: str | Path | None = None, lora_scale: float | None = None) -> str:
    """The fingerprint ``load_pipeline(source, base=base, lora_scale=...)`` would give, from file contents only."""
    return plan_model(str(source), None if base is None else str(base), lora_scale).fingerprint


def describe_model(source: str | Path, base: str | Path | None = None, lora_scale: float | None = None) -> str:
    """The line ``load_pipeline`` would put in ``LoadedModel.description``, from file keys only."""
    return plan_model(str(source), None if base is None else str(base), lora_scale).description


@dataclass
class ModelPlan:
    """What a model source is, told from its files without loading it: how to load it, its
    fingerprint (the store key's part) and the line the reports show."""

    name: str  # the source as the user named it
    kind: str  # "directory" | "checkpoint" | "weights" | "lora"
    source: str  # resolved: a path or hub id
    base: str | None  # resolved base (a pipeline directory, hub id or single-file checkpoint)
    base_name: str | None  # the base as the user named it (or the model's own)
    found: DetectedFormat | None = None  # the file's format (file kinds)
    config_dir: Path | None = None  # a single-file checkpoint's configs
    scale: float | None = None  # a LoRA's scale
    fingerprint: str = ""
    description: str = ""

    @property
    def shown_base(self) -> str | None:
        return self.base_name or self.base


def plan_model(name: str, base_name: str | None, lora_scale: Any = None) -> ModelPlan:
    """The :class:`ModelPlan` of ``name`` over ``base_name``; wrong combinations fail here, before any loading."""
    lora_scale = _checked_scale(lora_scale)
    base_name = base_name or default_base(name)
    source, base = resolve_model(name, base_name)
    path = Path(source).expanduser()
    if not path.is_file():
        _refuse_scale(lora_scale, name, "a pipeline directory")
        return ModelPlan(name, "directory", source, base, base_name,
                         fingerprint=fp.directory_fingerprint(_pipeline_directory(source)),
                         description=f"diffusers pipeline {name}")
    found = detect_file(path)
    if found.kind == "checkpoint":
        from .checkpoints import config_directory

        _refuse_scale(lora_scale, name, "an original single-file checkpoint")
        config_dir = config_directory(path, _config_base(base))
        return ModelPlan(name, "checkpoint", source, base, base_name, found, config_dir,
                         fingerprint=checkpoint_fingerprint(path, config_dir),
                         description=found.describe(config=str(config_dir)))
    if base is None:
        raise _needs_base(path)
    base_fingerprint = _base_fingerprint(base)
    plan = ModelPlan(name, "lora" if found.is_lora else "weights", source, base, base_name, found)
    if found.is_lora:
        plan.scale = 1.0 if lora_scale is None else lora_scale
    else:
        _refuse_scale(lora_scale, name, f"{found.describe()}, not a LoRA file")
    plan.fingerprint = weights_fingerprint(base_fingerprint, path, lora_scale=plan.scale)
    plan.description = found.describe(base=plan.shown_base, scale=plan.scale)
    return plan


def _build(plan: ModelPlan, dtype: str, component: str | None) -> tuple[Any, str | None]:
    """The planned pipeline (on the CPU) and the component a file replaced (``lora``, ``checkpoint``)."""
    if plan.kind == "directory":
        return _from_pretrained(_pipeline_directory(plan.source), dtype), None
    path = Path(plan.source).expanduser()
    state = read_state_dict(path)
    if plan.kind == "checkpoint":
        from .checkpoints import load_checkpoint

        return load_checkpoint(path, state, plan.found, plan.config_dir, dtype), "checkpoint"
    pipeline = _base_pipeline(str(plan.base), dtype)
    if plan.kind == "lora":
        from .lora import fuse_lora

        fuse_lora(pipeline, state, plan.found, path, plan.scale)
        return pipeline, "lora"
    return pipeline, apply_weights_file(pipeline, path, component=component, state=state)


def default_base(source: str) -> str | None:
    """The base a model names itself (a registered name's own base, e.g. ``toy:erased`` -> ``toy:base``)."""
    from .registry import ModelRef, discover, path_exists, resolve_named

    ref = resolve_named(source, discover().model_sources, path_exists)
    return ref.base if isinstance(ref, ModelRef) else None


def resolve_model(source: str, base: str | None) -> tuple[str, str | None]:
    """``source`` and ``base`` as loadable paths or hub ids: registered names and ``module:callable``
    model sources are resolved (a name's own base unless ``base`` is given)."""
    from .registry import ModelRef, discover, path_exists, resolve_named

    sources = discover().model_sources

    def one(name: str) -> ModelRef:
        ref = resolve_named(name, sources, path_exists)
        if ref is None:
            return ModelRef(name)
        if isinstance(ref, (str, Path)):
            return ModelRef(str(ref))
        if not isinstance(ref, ModelRef):
            raise UnlearnAtkError(f"model source {name!r} gave {ref!r}; a model source returns a path or a ModelRef")
        return ref

    model = one(source)
    base = base if base is not None else model.base
    return model.source, (one(base).source if base is not None else None)



def _checked_scale(lora_scale: Any) -> float | None:
    if lora_scale is None:
        return None
    try:
        return parse_lora_scale(lora_scale)
    except ValueError as error:
        raise UnlearnAtkError(f"lora_scale={lora_scale!r}: {error}") from None


def _refuse_scale(lora_scale: float | None, name: str, what: str) -> None:
    if lora_scale is not None and lora_scale != 1.0:
        raise SettingProblem("lora_scale", f"{name} is {what}: a LoRA scale ({lora_scale}) applies only to a LoRA file",
                             "1 (or leave it out)")


def _config_base(base: str | None) -> str | None:
    """The directory a base gives a single-file checkpoint its configs from: a pipeline directory, or a
    hub id's (the base itself is fetched, as any base is); a base that is a file gives none."""
    if base is None or Path(base).expanduser().is_file():
        return None
    return str(_pipeline_directory(base))


def _base_checkpoint(base: str) -> tuple[Path, DetectedFormat, Path] | None:
    """A base that is a file: (path, format, config directory); it must be a single-file checkpoint."""
    path = Path(base).expanduser()
    if not path.is_file():
        return None
    from .checkpoints import config_directory

    found = detect_file(path)
    if found.kind != "checkpoint":
        raise UnlearnAtkError(f"the base {base} holds {found.describe()}, which goes over a base itself; a base is a "
                              "pipeline directory, a hub id or an original single-file checkpoint (UNet, VAE and text "
                              "encoder in one file)")
    return path, found, config_directory(path, None)


def _base_fingerprint(base: str) -> str:
    checkpoint = _base_checkpoint(base)
    if checkpoint is None:
        return fp.directory_fingerprint(_pipeline_directory(base))
    return checkpoint_fingerprint(checkpoint[0], checkpoint[2])


def _base_pipeline(base: str, dtype: str) -> Any:
    """The base pipeline (on the CPU): a directory, a hub id or a single-file checkpoint."""
    checkpoint = _base_checkpoint(base)
    if checkpoint is None:
        return _from_pretrained(_pipeline_directory(base), dtype)
    from .checkpoints import load_checkpoint

    path, found, config_dir = checkpoint
    return load_checkpoint(path, read_state_dict(path), found, config_dir, dtype)


def _pipeline_directory(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        raise UnlearnAtkError(
            f"{source} is a file, not a pipeline directory: a base model (or a model without a base) is a "
            "diffusers pipeline directory or a hub id; a weights file is the model applied over such a base"
        )
    if path.suffix in WEIGHT_SUFFIXES or source.startswith((".", "/", "~")):
        raise UnlearnAtkError(f"{source}: no such file or directory")
    if HUB_ID.match(source):
        return _download_from_hub(source)
    raise UnlearnAtkError(f"{source!r} is neither an existing path nor a hub id like 'CompVis/stable-diffusion-v1-4'")



def detect_file(path: str | Path) -> DetectedFormat:
    """The format of a weights file, from its keys (see :mod:`pytest_unlearnatk.formats`)."""
    path = Path(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UnlearnAtkError(
            f"{path}: not a weights file (expected one of {', '.join(WEIGHT_SUFFIXES)}) "
            "and not a pipeline directory"
        )
    return detect(key_shapes(path), path)


def _needs_base(path: Path) -> SettingProblem:
    return SettingProblem("base", f"{path} is a weights file; it needs the base pipeline it was fine-tuned from",
                          "BASE (a pipeline directory or hub id)")


def weights_fingerprint(base_fingerprint: str, weights_file: Path, lora_scale: float | None = None) -> str:
    """A weights file applied over a base: the file's contents decide which component it replaces.
    A LoRA file (``lora_scale`` given) is keyed with its scale: each scale is another model."""
    if lora_scale is None:
        return fp.combine(base_fingerprint, f"weights:{fp.file_sha256(weights_file)}")
    return fp.combine(base_fingerprint, f"lora:{fp.file_sha256(weights_file)}:scale={float(lora_scale)!r}")


def checkpoint_fingerprint(path: Path, config_dir: Path) -> str:
    """An original single-file checkpoint: its contents and the config directory it is read with."""
    return fp.combine(fp.directory_fingerprint(config_dir), f"checkpoint:{fp.file_sha256(path)}")


class LazyModel:
    """A model named by its source; fingerprinted from files, loaded only when first used."""

    def __init__(self, source: str, base: str | None = None, device: str | None = "auto", dtype: str | None = "auto",
                 lora_scale: float | None = None) -> None:
        self.source, self.device, self.dtype, self.lora_scale = source, device, dtype, lora_scale
        self.base = base if base is not None else default_base(source)
        self._fingerprint: str | None = None
        self._description: str | None = None
        self._loaded: LoadedModel | None = None
        self._failure: UnlearnAtkError | None = None

    @property
    def name(self) -> str:
        return Path(self.source).name or self.source

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._inspect()
        return self._fingerprint

    @property
    def description(self) -> str:
        """What is (or would be) loaded, in one line; told from file keys, without loading."""
        if self._description is None:
            self._inspect()
        return self._description

    def _inspect(self) -> None:
        source = self._loaded or plan_model(self.source, self.base, self.lora_scale)
        self._fingerprint, self._description = source.fingerprint, source.description

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def load(self) -> LoadedModel:
        """The loaded model. Loading is tried once: after a failure, every later use raises at once
        (the first error told the cause; the next gates need not try again, nor repeat it)."""
        if self._failure is not None:
            raise UnlearnAtkError(f"{self.source} could not be loaded (see the first error about it in this run)")
        if self._loaded is None:
            try:
                self._loaded = load_pipeline(self.source, base=self.base, device=self.device, dtype=self.dtype,
                                             lora_scale=self.lora_scale)
            except UnlearnAtkError as error:
                self._failure = error
                raise
        return self._loaded


def _download_from_hub(repo_id: str) -> Path:
    from diffusers import StableDiffusionPipeline

    try:
        return Path(StableDiffusionPipeline.download(repo_id))
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        raise UnlearnAtkError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:200]}). "
            "Without hub access, download the pipeline elsewhere and pass its local directory instead."
        ) from exc


def _from_pretrained(directory: Path, dtype: str, **components: Any) -> Any:
    """The pipeline in ``directory``; ``components`` (``unet=...``) replace the directory's own."""
    import torch

    with _quiet_libraries():
        from diffusers import StableDiffusionPipeline
    if not (directory / "model_index.json").is_file():
        raise UnlearnAtkError(
            f"{directory} has no model_index.json, so it is not a diffusers pipeline directory; "
            "pass a directory written by save_pretrained, a hub id, or a weights file with a base"
        )
    try:
        with _quiet_libraries():
            pipeline = StableDiffusionPipeline.from_pretrained(
                directory, dtype=getattr(torch, dtype), safety_checker=None, requires_safety_checker=False, **components
            )
    except KeyError as exc:  # a model_index.json without a key diffusers needs
        raise UnlearnAtkError(f"{directory}: could not load it as a Stable Diffusion pipeline: its model_index.json "
                              f"has no {exc} entry; it must be the one save_pretrained wrote") from exc
    except (OSError, ValueError) as exc:
        raise UnlearnAtkError(f"{directory}: could not load it as a Stable Diffusion pipeline: {exc}") from exc
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """No "Loading pipeline components" / "Loading weights" bars and no info-level notices (such as
    transformers' "requires torchvision ... falling back") from diffusers and transformers while we
    import and load (they fill captured test output); their settings are restored afterwards.
    Their errors still show."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    bars = [library for library in libraries if library.is_progress_bar_enabled()]
    levels = [library.get_verbosity() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
        library.set_verbosity(max(library.get_verbosity(), library.ERROR))
    try:
        yield
    finally:
        for library, level in zip(libraries, levels):
            library.set_verbosity(level)
        for library in bars:
            library.enable_progress_bar()


# --- weights files ---------------------------------------------------------------------------


def read_state_dict(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt``/``.bin``/``.ckpt`` read with ``weights_only=True``
    (``mmap``: memory-mapped, for reading key names and shapes only)."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # an old (non-zip) torch file
    except pickle.UnpicklingError as exc:
        raise UnlearnAtkError(
            f"{path}: could not be read as a weights file: it holds pickled objects other than tensors, "
            "which torch.load(weights_only=True) refuses for safety; re-save the state dict with safetensors"
        ) from exc
    except Exception as exc:
        raise UnlearnAtkError(
            f"{path}: could not be read as a weights file ({type(exc).__name__}: {str(exc)[:200]}); "
            "is it truncated, or not a .safetensors / torch state dict?"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning / CompVis checkpoints wrap the weights
    if not isinstance(state, dict) or not state:
        raise UnlearnAtkError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UnlearnAtkError(f"{path}: {len(not_tensors)} entries are not tensors (e.g. {not_tensors[:3]})")
    return state


def apply_weights_file(pipeline: Any, path: str | Path, component: str | None = None,
                       state: dict[str, Any] | None = None) -> str:
    """Load a UNet or text-encoder weights file into ``pipeline`` in place; returns the component name.
    ``state``: the file's tensors when already read."""
    path = Path(path)
    if component is not None and component not in COMPONENTS:
        raise UnlearnAtkError(f"component={component!r}; use one of {', '.join(COMPONENTS)}")
    state = read_state_dict(path) if state is None else state
    if any(key.startswith(LDM_UNET_PREFIX) for key in state):
        if component not in (None, "unet"):
            raise UnlearnAtkError(f"{path} holds an original-layout (LDM) UNet, but component={component!r} was asked for")
        name, weights = "unet", _convert_ldm_unet(state, pipeline.unet.config, path)
    else:
        name, weights = _match_component(state, pipeline, component, path)
    module = getattr(pipeline, name)
    _check_keys(weights, module.state_dict(), name, path)
    module.load_state_dict(weights, strict=True)
    return name


def _convert_ldm_unet(state: dict[str, Any], unet_config: Any, path: Path) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_keys = [k for k in state if k.startswith(LDM_UNET_PREFIX) and k not in LDM_SCHEDULE_KEYS]
    check_original_groups(state, path)
    try:
        converted = convert_ldm_unet_checkpoint({k: state[k] for k in unet_keys}, dict(unet_config))
    except (KeyError, IndexError, ValueError) as exc:
        raise UnlearnAtkError(
            f"{path}: the original-layout UNet does not fit the base pipeline's UNet config "
            f"({type(exc).__name__}: {exc}); is the base the model this checkpoint was trained from?"
        ) from exc
    if len(converted) < len(unet_keys):
        raise UnlearnAtkError(
            f"{path}: {len(unet_keys) - len(converted)} of {len(unet_keys)} UNet keys were not used by the "
            "conversion to the base pipeline's UNet layout; is the base the model this checkpoint was trained from?"
        )
    return converted


def check_original_groups(state: dict[str, Any], path: Path) -> None:
    """An original-layout file holds only the known groups (UNet, VAE, text encoder, EMA, schedule)."""
    other = [k for k in state if not k.startswith(LDM_UNET_PREFIX) and k not in LDM_SCHEDULE_KEYS]
    unknown = [k for k in other if not k.startswith(LDM_OTHER_PREFIXES)]
    if unknown:
        raise UnlearnAtkError(
            f"{path}: original-layout checkpoint with {len(unknown)} keys outside the known groups "
            f"(model.diffusion_model., first_stage_model., cond_stage_model.), e.g. {unknown[:3]}"
        )
    if any(k.startswith("model_ema.") for k in other):
        warnings.warn(f"{path}: its EMA copy of the UNet (model_ema.*) is not used; the trained weights "
                      "(model.diffusion_model.*) are, as in diffusers' single-file loading", stacklevel=4)


def _match_component(state: dict[str, Any], pipeline: Any, component: str | None, path: Path) -> tuple[str, dict]:
    """Find which component (and which key prefix) a diffusers-layout file belongs to."""
    best: tuple[int, str, dict] = (0, "", {})
    for name in [component] if component else COMPONENTS:
        expected = set(getattr(pipeline, name).state_dict())
        inner = ("", "text_model.") if name == "text_encoder" else ("",)
        for prefix in ("", f"{name}.", "model."):
            for sub in inner:
                strip = prefix + sub
                renamed = {k[len(strip):]: v for k, v in state.items() if k.startswith(strip)}
                score = len(expected & renamed.keys())
                if score > best[0]:
                    # keys that did not carry the prefix stay as they are, so they show up as unexpected
                    renamed.update({k: v for k, v in state.items() if not k.startswith(strip)})
                    best = (score, name, renamed)
    if best[0] == 0:
        raise UnlearnAtkError(
            f"{path}: none of its {len(state)} keys match the base pipeline's "
            f"{' or '.join([component] if component else COMPONENTS)} (first keys: {list(state)[:3]}). "
            "Expected diffusers keys, optionally prefixed with unet./text_encoder./model., "
            "or an original-layout UNet (model.diffusion_model.*)"
        )
    return best[1], {k: v for k, v in best[2].items() if k not in IGNORED_BUFFER_KEYS}


def _check_keys(weights: dict[str, Any], expected: dict[str, Any], name: str, path: Path,
                config_dir: Path | None = None) -> None:
    """Every key the module has, no other, each of its shape. ``config_dir``: the directory a
    single-file checkpoint's configs came from (else the weights go over the base pipeline)."""
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    into = f"the {name} configured by {config_dir}" if config_dir is not None else f"the base pipeline's {name}"
    hint = (f"Is {config_dir} a pipeline of the same architecture as the checkpoint?" if config_dir is not None
            else f"Is it a {name} file for this base model? Check --unlearn-base / base=.")
    if missing or unexpected:
        raise UnlearnAtkError(
            f"{path}: its keys do not match {into}: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). {hint}"
        )
    wrong_shape = [
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    if wrong_shape:
        raise UnlearnAtkError(
            f"{path}: {len(wrong_shape)} tensors have the wrong shape for {into} "
            f"(e.g. {wrong_shape[:3]}); " + (hint if config_dir is not None else "the base is probably a different model size")
        )
