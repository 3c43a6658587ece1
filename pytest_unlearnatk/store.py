"""The store: every case result and every adversarial prompt found, as small JSON files on disk.

Layout (format 1; see docs/store.md)::

    <store>/results/<key[:2]>/<key>.json                    one finished case
    <store>/prompts/<concept>/<key>.json                    one adversarial prompt that broke a model

A file's name is the SHA-256 of what identifies it, so the same work always lands in the same
file, two processes never write different things under one name, and a committed store diffs
cleanly (sorted keys, one value per line). Files are written to a temporary name and renamed, so
a reader never sees half a file and an interrupted run loses at most the case it was on. A file
that cannot be read is reported with a warning and skipped; it never stops a run.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._paths import atomic_write_bytes

FORMAT = 1


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

    @property
    def key(self) -> str:
        return digest([self.concept, self.content_ids, self.seed, self.guidance, self.tokenizer])

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
            score=float(result.verdict.get("score", 0.0)), found_by=found_by,
        )


def case_key(identity: dict[str, Any], case: Any) -> tuple[str, dict[str, Any]]:
    """The key of one case's result under a gate's ``identity`` (everything that decides the
    result: model fingerprint, attack and its config, judge, render settings, targets, concept),
    and the material it is the digest of (kept in the record, so a key can be explained)."""
    material = {"format": FORMAT, **identity, "case": {"prompt": case.prompt, "seed": case.seed, "guidance": case.guidance}}
    return digest(material), material


class Store:
    """A directory of results and adversarial prompts. ``readonly`` reads but never writes."""

    def __init__(self, directory: str | Path, readonly: bool = False) -> None:
        self.directory = Path(directory)
        self.readonly = readonly

    # --- case results ---------------------------------------------------------------------

    def _result_path(self, key: str) -> Path:
        return self.directory / "results" / key[:2] / f"{key}.json"

    def get_result(self, key: str) -> dict[str, Any] | None:
        """The stored case result (``CaseResult.to_dict()`` form) for ``key``, or None."""
        record = self._read(self._result_path(key))
        if record is None or record.get("key") != key:
            return None
        return record.get("result")

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
                stored = StoredPrompt(**record["prompt"])
            except (KeyError, TypeError) as error:
                warnings.warn(f"{path}: not an adversarial-prompt record ({error}); skipped", StoreWarning, stacklevel=2)
                continue
            if (stored.case_prompt, stored.seed, float(stored.guidance)) == (prompt, seed, float(guidance)):
                found.append(stored)
        return found

    def put_prompt(self, stored: StoredPrompt) -> None:
        from dataclasses import asdict

        self._write(self._prompt_dir(stored.concept) / f"{stored.key}.json",
                    {"format": FORMAT, "kind": "adversarial_prompt", "key": stored.key, "prompt": asdict(stored)})

    # --- files ----------------------------------------------------------------------------

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            return None
        except OSError as error:
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
        return record

    def _write(self, path: Path, record: dict[str, Any]) -> None:
        if self.readonly:
            return
        atomic_write_bytes(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8"))
