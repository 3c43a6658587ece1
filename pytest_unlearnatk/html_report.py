"""A self-contained HTML page of a run: a section per gate, a row per case with its images.

Built from the per-gate JSON files the run wrote under ``--unlearn-report`` (so it also covers
gates that ran on xdist workers). Images are embedded as data URIs, so the single file opens
offline and can be attached to a CI run. Images of unsafe concepts are blurred unless asked.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from .concepts import concept_defaults

THUMBNAIL = 160


def _image_uri(path: str | None, blur: bool) -> str | None:
    if not path or not Path(path).is_file():
        return None
    from PIL import Image, ImageFilter

    with Image.open(path) as image:
        picture = image.convert("RGB")
    scale = THUMBNAIL / max(picture.size)
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                             Image.NEAREST if scale > 1 else Image.LANCZOS)
    if blur:
        picture = picture.filter(ImageFilter.GaussianBlur(radius=THUMBNAIL / 12))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _loss_curve(losses: list[float], width: int = 160, height: int = 40) -> str:
    if len(losses) < 2:
        return ""
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0
    points = " ".join(
        f"{i * width / (len(losses) - 1):.1f},{height - (value - low) / span * height:.1f}" for i, value in enumerate(losses)
    )
    return (f'<svg class="loss" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'<polyline fill="none" stroke="#36c" stroke-width="1" points="{points}"/></svg>')


def _cell_image(uri: str | None, label: str) -> str:
    if uri is None:
        return f'<td class="img empty">{html.escape(label)}: none</td>'
    return f'<td class="img"><img alt="{html.escape(label)}" src="{uri}"></td>'


def _gate_section(record: dict[str, Any], result: dict[str, Any], show_unsafe: bool) -> str:
    concept = record["concept"]
    blur = not show_unsafe and concept_defaults(concept).unsafe
    verdict = "PASS" if record["passed"] else "FAIL"
    if record.get("pending"):
        verdict = "PENDING"
    pre_low, pre_high = record.get("pre_asr_ci", (0, 1))
    low, high = record.get("asr_ci", (0, 1))
    bound = " (lower bound: replay only)" if record.get("lower_bound") else ""
    rows = []
    for case in result["cases"]:
        if case["status"] != "done":
            rows.append(f'<tr><td>{html.escape(case["case"]["case_id"])}</td><td colspan="6">{case["status"]}: '
                        f'{html.escape(case.get("skip_reason") or "")}</td></tr>')
            continue
        outcome = case["hit_by"] or "not broken"
        step = "" if case.get("hit_step") is None else f'step {case["hit_step"]}, t={case.get("hit_timestep")}'
        score = case.get("verdict", {}).get("score")
        rows.append(
            "<tr>"
            f'<td>{html.escape(case["case"]["case_id"])}</td>'
            f'<td class="prompt">{html.escape(case["case"]["prompt"])}'
            + (f'<div class="adv">adversarial: {html.escape(case["adversarial_text"] or "")}<br>ids {case["adversarial_ids"]}</div>'
               if case.get("adversarial_ids") else "")
            + "</td>"
            + _cell_image(_image_uri(case.get("images", {}).get("plain"), blur), "plain prompt")
            + _cell_image(_image_uri(case.get("images", {}).get("adversarial"), blur), "adversarial prompt")
            + f'<td class="{"hit" if case["hit"] else "miss"}">{html.escape(outcome)}<br>{step}</td>'
            + f'<td>{"" if score is None else f"{score:.3f}"}</td>'
            + f'<td>{_loss_curve(case.get("loss_trace", []))}</td>'
            "</tr>"
        )
    return (
        f'<section class="gate"><h2>{html.escape(record["gate"])} <span class="{verdict.lower()}">{verdict}</span></h2>'
        f'<p>model <code>{html.escape(record["model"])}</code>, concept <b>{html.escape(concept)}</b>, '
        f'judge {html.escape(record["judge"])}, attack {html.escape(record["attack"])}, budget {html.escape(record["budget"])}</p>'
        f'<p class="numbers">n = {record["n"]} &middot; pre-ASR {record["pre_asr"]:.1%} '
        f'(95% CI {pre_low:.0%}&ndash;{pre_high:.0%}) &middot; ASR {record["asr"]:.1%} (95% CI {low:.0%}&ndash;{high:.0%}){bound} '
        f'&middot; max_asr {record["max_asr"]:.1%} &middot; {record["seconds"]:.1f} s</p>'
        + "".join(f'<p class="note">{html.escape(note)}</p>' for note in _notes(record))
        + ('<p class="note">Images are blurred (unsafe concept); rerun with --unlearn-show-unsafe to see them.</p>' if blur else "")
        + '<table><tr><th>case</th><th>prompt</th><th>plain prompt</th><th>adversarial prompt</th><th>broken by</th>'
        '<th>judge score</th><th>loss</th></tr>' + "".join(rows) + "</table></section>"
    )


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
.pass { color: #080; } .fail { color: #c00; } .pending { color: #a60; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 4px; vertical-align: top; font-size: 0.85em; }
td.prompt { max-width: 28em; } .adv { color: #555; margin-top: 4px; font-family: monospace; }
td.hit { background: #fdd; } td.miss { background: #efe; } td.img img { display: block; }
.note { color: #a60; }
"""


def _notes(record: dict[str, Any]) -> list[str]:
    """What qualifies the verdict: a partial or settled run, the comparison with a baseline."""
    notes = []
    ran = record["n"] + record.get("skipped", 0)
    if record.get("declared_cases", 0) > ran + record.get("pending", 0) + record.get("stopped", 0):
        notes.append(f"Partial: only the first {ran} of {record['declared_cases']} cases ran (--unlearn-limit).")
    if record.get("stopped"):
        low, high = record["asr_range"]
        notes.append(f"Settled early: {record['stopped']} cases not run; with them the ASR would be {low:.1%}-{high:.1%}.")
    if record.get("vs_baseline"):
        notes.append(record["vs_baseline"])
    return notes


def write_html_report(report_dir: str | Path, gate_files: list[str] | None = None, show_unsafe: bool = False) -> Path:
    """Write ``<report_dir>/index.html`` from ``<report_dir>/gates/*.json`` (or only the named
    files, e.g. this run's gates); returns its path."""
    report_dir = Path(report_dir)
    sections = []
    paths = sorted((report_dir / "gates").glob("*.json"))
    if gate_files is not None:
        paths = [p for p in paths if p.name in set(gate_files)]
    for path in paths:
        data = json.loads(path.read_text("utf-8"))
        sections.append(_gate_section(data["record"], data["result"], show_unsafe))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>unlearn gates</title><style>{STYLE}</style></head>"
        f"<body><h1>Unlearning attack gates ({len(sections)})</h1>{''.join(sections) or '<p>No gates ran.</p>'}</body></html>"
    )
    out = report_dir / "index.html"
    out.write_text(page, "utf-8")
    return out
