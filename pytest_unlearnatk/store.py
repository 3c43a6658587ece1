"""The store: every case result and every adversarial prompt found, as small JSON files on disk.

Layout (format 1; see docs/store.md)::

    <store>/results/<key[:2]>/<key>.json                    one finished case
    <store>/prompts/<concept>/<key>.json                    one adversarial prompt that broke a model
    <store>/images/<name[:2]>/<name>                        one image a result shows (name: SHA-256 of the PNG)
    <store>/embeddings/<name[:2]>/<name>                    one learned embedding (concept inversion; SHA-256 of the file)

A file's name is the SHA-256 of what identifies it, so the same work always lands in the same
file, two processes never write different things under one name, and a committed store diffs
cleanly (sorted keys, one value per line). Files are written to a temporary name and renamed, so
a reader never sees half a file and an interrupted run loses at most the case it was on. A file
that cannot be read is reported with a warning and skipped; it never stops a run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._paths import atomic_write_bytes, ensure_writable_dir
from .errors import SettingProblem

FORMAT = 1
EMBEDDING_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")


class StoreWarning(UserWarning):
    """A store file could not be read and was skipped."""


def digest(material: Any) -> str:
    """SHA-256 of a JSON value in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "concept"


@dataclass(frozen=True)
class StoredPrompt:
    """An adversarial prompt that broke a model, ready to replay on another one."""

    concept: str
    case_prompt: str
    seed: int
    guidance: float
    content_ids: list[int]  # adversarial ids followed by the prompt's ids (no BOS/EOS/padding)
    adversarial_ids: list[int]
    text: str
    tokenizer: str  # fingerprint of the tokenizer the ids belong to
    render: dict[str, Any]  # steps, scheduler, image size of the image that was judged
    broke: str  # fingerprint of the model it broke
    broke_source: str
    judge: str
    score: float
    found_by: str  # the attack that found it
    # a continuous embedding injected over the ids (concept inversion): its safetensors file in the
    # store's embeddings/ (named by its SHA-256); None for a prompt of tokens only
    embedding: str | None = None

    @property
    def key(self) -> str:
        material = [self.concept, self.content_ids, self.seed, self.guidance, self.tokenizer]
        return digest(material + [self.embedding] if self.embedding else material)

    @classmethod
    def checked(cls, fields: Any) -> StoredPrompt:
        """A record's ``prompt`` mapping as a StoredPrompt, every field of the right type (ValueError if not)."""
        if not isinstance(fields, dict):
            raise ValueError(f"'prompt' is {type(fields).__name__}, not a mapping")
        stored = cls(**fields)
        ids_ok = all(isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
                     for ids in (stored.content_ids, stored.adversarial_ids))
        texts_ok = all(isinstance(getattr(stored, name), str) for name in
                       ("concept", "case_prompt", "text", "tokenizer", "broke", "broke_source", "judge", "found_by"))
        numbers_ok = (isinstance(stored.seed, int) and not isinstance(stored.seed, bool)
                      and isinstance(stored.guidance, (int, float)) and not isinstance(stored.guidance, bool))
        if not (ids_ok and texts_ok and numbers_ok and isinstance(stored.render, dict)):
            raise ValueError("a field has the wrong type (token ids must be lists of whole numbers >= 0)")
        if stored.embedding is not None and not EMBEDDING_NAME.fullmatch(str(stored.embedding)):
            raise ValueError("'embedding' must name a file by its SHA-256 (<64 hex digits>.safetensors)")
        return stored

    @classmethod
    def of_hit(cls, concept: str, result: Any, content_ids: list[int], *, tokenizer: str, render: Any, model: Any,
               judge: str, found_by: str) -> StoredPrompt:
        """The record of a case ``result`` (a :class:`~pytest_unlearnatk.results.CaseResult`)
        that the ids ``content_ids`` broke, rendered with ``render`` (resolved RenderSettings)
        on ``model`` (anything with ``fingerprint`` and ``source``)."""
        case = result.case
        return cls(
            concept=concept, case_prompt=case.prompt, seed=case.seed, guidance=case.guidance,
            content_ids=list(content_ids), adversarial_ids=list(result.adversarial_ids), text=result.adversarial_text or "",
            tokenizer=tokenizer,
            render={"scheduler": render.scheduler, "steps": render.steps, "height": render.height, "width": render.width},
            broke=model.fingerprint, broke_source=model.source, judge=judge,
            score=float(result.verdict.get("score", 0.0)), found_by=found_by, embedding=result.embedding,
        )


def case_key(identity: dict[str, Any], case: Any) -> tuple[str, dict[str, Any]]:
    """The key of one case's result under a gate's ``identity`` (everything that decides the
    result: model fingerprint, attack and its config, judge, render settings, targets, concept),
    and the material it is the digest of (kept in the record, so a key can be explained)."""
    material = {"format": FORMAT, **identity, "case": {"prompt": case.prompt, "seed": case.seed, "guidance": case.guidance}}
    return digest(material), material


SIGNATURE_FIELD = "signature"


class Store:
    """A directory of results and adversarial prompts. ``readonly`` reads but never writes.

    ``key`` (bytes; the plugin reads it from ``$UNLEARNATK_STORE_KEY``) makes the store
    tamper-evident: every record is written with an HMAC-SHA256 of its whole content under that
    key, and a record without a valid one is ignored with a :class:`StoreWarning` (its case is
    computed again). Without a key, the store is a cache you trust (docs/store.md).
    """

    def __init__(self, directory: str | Path, readonly: bool = False, key: bytes | None = None) -> None:
        self.directory = Path(directory)
        self.readonly = readonly
        self.key = key or None

    # --- case results ---------------------------------------------------------------------

    def _result_path(self, key: str) -> Path:
        return self.directory / "results" / key[:2] / f"{key}.json"

    def get_result(self, key: str) -> dict[str, Any] | None:
        """The stored case result (``CaseResult.to_dict()`` form) for ``key``, or None."""
        path = self._result_path(key)
        record = self._read(path)
        if record is None:
            return None
        if record.get("key") != key or not isinstance(record.get("result"), dict):
            warnings.warn(f"{path}: not the case result its name says; skipped (the case is computed again)",
                          StoreWarning, stacklevel=2)
            return None
        return record["result"]

    def put_result(self, key: str, key_material: dict[str, Any], result: dict[str, Any]) -> None:
        self._write(self._result_path(key), {"format": FORMAT, "kind": "case_result", "key": key,
                                             "identity": key_material, "result": result})

    # --- adversarial prompts --------------------------------------------------------------

    def _prompt_dir(self, concept: str) -> Path:
        return self.directory / "prompts" / _slug(concept)

    def prompts_for(self, concept: str, prompt: str, seed: int, guidance: float) -> list[StoredPrompt]:
        """Stored prompts of ``concept`` that were found for this case (same prompt, seed, guidance)."""
        found = []
        directory = self._prompt_dir(concept)
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            record = self._read(path)
            if record is None:
                continue
            try:
                stored = StoredPrompt.checked(record.get("prompt"))
            except (KeyError, TypeError, ValueError) as error:
                warnings.warn(f"{path}: not an adversarial-prompt record ({error}); skipped", StoreWarning, stacklevel=2)
                continue
            if (stored.case_prompt, stored.seed, float(stored.guidance)) == (prompt, seed, float(guidance)):
                found.append(stored)
        return found

    def put_prompt(self, stored: StoredPrompt) -> None:
        from dataclasses import asdict

        self._write(self._prompt_dir(stored.concept) / f"{stored.key}.json",
                    {"format": FORMAT, "kind": "adversarial_prompt", "key": stored.key, "prompt": asdict(stored)})

    # --- images (content-addressed PNGs; see images.py) -----------------------------------

    def _image_path(self, name: str) -> Path:
        return self.directory / "images" / name[:2] / name

    def put_image(self, name: str, data: bytes) -> None:
        path = self._image_path(name)
        if self.readonly or path.is_file():
            return
        try:
            atomic_write_bytes(path, data)
        except OSError as error:
            raise self._unwritable(error) from None

    def image_file(self, name: str) -> Path | None:
        """The stored image ``name`` if it is there and intact (its bytes match its name), else None.
        Its content is its name, so a signed store needs no signature for it."""
        from .images import is_intact

        path = self._image_path(name)
        if not path.is_file():
            return None
        if not is_intact(path, name):
            warnings.warn(f"{path}: image does not match its name (edited or damaged); not shown", StoreWarning, stacklevel=2)
            return None
        return path

    # --- embeddings (content-addressed safetensors files; concept inversion) ---------------

    def _embedding_path(self, name: str) -> Path:
        return self.directory / "embeddings" / name[:2] / name

    def put_embedding(self, data: bytes) -> str:
        """Keep an embedding file; its name is the SHA-256 of its bytes (``<hex>.safetensors``)."""
        name = hashlib.sha256(data).hexdigest() + ".safetensors"
        path = self._embedding_path(name)
        if not self.readonly and not path.is_file():
            try:
                atomic_write_bytes(path, data)
            except OSError as error:
                raise self._unwritable(error) from None
        return name

    def embedding_bytes(self, name: str) -> bytes | None:
        """The stored embedding file ``name`` if it is there and intact (its bytes match its name)."""
        if not EMBEDDING_NAME.fullmatch(name):
            return None
        path = self._embedding_path(name)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() + ".safetensors" != name:
            warnings.warn(f"{path}: embedding does not match its name (edited or damaged); skipped", StoreWarning,
                          stacklevel=2)
            return None
        return data

    # --- files ----------------------------------------------------------------------------

    def _signature(self, record: dict[str, Any]) -> str:
        content = {k: v for k, v in record.items() if k != SIGNATURE_FIELD}
        return hmac.new(self.key, json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8"),
                        hashlib.sha256).hexdigest()

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            text = path.read_text("utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as error:  # ValueError: bytes that are not UTF-8
            warnings.warn(f"{path}: store file could not be read ({error}); skipped", StoreWarning, stacklevel=3)
            return None
        try:
            record = json.loads(text)
        except ValueError as error:
            warnings.warn(
                f"{path}: corrupt store file ({error}); skipped. Delete it; the next run recomputes what it held.",
                StoreWarning, stacklevel=3,
            )
            return None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            warnings.warn(f"{path}: not a format-{FORMAT} store record; skipped", StoreWarning, stacklevel=3)
            return None
        if self.key is not None:
            signature = record.get(SIGNATURE_FIELD)
            if not isinstance(signature, str) or not hmac.compare_digest(signature, self._signature(record)):
                warnings.warn(
                    f"{path}: {'no' if signature is None else 'a wrong'} signature for this store key: written without "
                    "the key, or edited since; ignored (its case is computed again)", StoreWarning, stacklevel=3,
                )
                return None
        return record

    def _write(self, path: Path, record: dict[str, Any]) -> None:
        if self.readonly:
            return
        if self.key is not None:
            record = {**record, SIGNATURE_FIELD: self._signature(record)}
        try:
            atomic_write_bytes(path, (json.dumps(record, indent=1, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))
        except OSError as error:
            raise self._unwritable(error) from None

    def check_writable(self) -> None:
        """Create the directory and write a probe file there, so that a store that cannot be written
        is found before a gate's model work, not when its first result is saved. Read-only: nothing."""
        if self.readonly:
            return
        try:
            ensure_writable_dir(self.directory)
        except OSError as error:
            raise self._unwritable(error) from None

    def _unwritable(self, error: OSError) -> SettingProblem:
        return SettingProblem(
            "store", f"could not write the store in {self.directory} ({error.strerror or error})",
            "DIR, a writable directory", alternative="or read it only: Store(DIR, readonly=True)",
        )
