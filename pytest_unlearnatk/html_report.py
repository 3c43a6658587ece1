"""A self-contained HTML page of a run: a summary table, then a section per gate with a row per
case (broken cases first) and its target, plain and adversarial images.

Built from the per-gate JSON files the run wrote under ``--unlearn-report`` (so it also covers
gates that ran on xdist workers) and the images in ``<report>/images/``. Images are embedded as
data URIs, so the single file opens offline and can be attached to a CI run. Images of unsafe
concepts are blurred unless asked (the PNG files beside it are already blurred when kept).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from .concepts import concept_defaults
from .images import IMAGE_NAME, safe_name
from .report import SUMMARY_HEADER, GateRecord, summary_rows
from .results import WHITE_BOX

THUMBNAIL = 128


def _image_uri(path: Path, blur: bool) -> str:
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


def _score(value: Any) -> str:
    return "" if value is None else f" · score {value:.3f}"


def _image_labels(case: dict[str, Any]) -> dict[str, str]:
    """What each image of a case is: which prompt or candidate, which step, which judge score."""
    score = case.get("verdict", {}).get("score")
    if case["hit_by"] == "replay":
        adversarial = f"stored prompt (replay){_score(score)}"
    elif case["hit"] and case["hit_by"] != "plain":
        adversarial = f"candidate that broke it, step {case.get('hit_step')}{_score(score)}"
    else:
        checks = case.get("checks") or []
        adversarial = f"last candidate checked, step {checks[-1]['step']}{_score(score)}" if checks else "last candidate"
    plain_score = case.get("plain_score", score if case["hit_by"] == "plain" else None)
    return {"target": "target (base model, plain prompt)", "plain": f"plain prompt{_score(plain_score)}",
            "adversarial": adversarial}


def _cell_image(images_dir: Path, name: str | None, label: str, blur: bool) -> tuple[str, bool]:
    """The cell of one image, and whether the image should be there but is not."""
    if name is None:
        return '<td class="img empty">&ndash;</td>', False
    path = images_dir / name
    if not IMAGE_NAME.fullmatch(name) or not path.is_file():  # a name is a digest, never a path
        return f'<td class="img missing">image missing<br><small>{html.escape(label)}</small></td>', True
    return (f'<td class="img"><figure><img alt="{html.escape(label)}" src="{_image_uri(path, blur)}">'
            f'<figcaption>{html.escape(label)}</figcaption></figure></td>'), False


def _case_row(case: dict[str, Any], images_dir: Path, blur: bool) -> tuple[str, int]:
    """A case's table row and how many of its images are missing."""
    case_id = html.escape(case["case"]["case_id"])
    if case["status"] != "done":
        return (f'<tr class="miss"><td>{case_id}</td><td colspan="6">{case["status"]}: '
                f'{html.escape(case.get("skip_reason") or "")}</td></tr>'), 0
    labels, images, missing = _image_labels(case), case.get("images", {}), 0
    cells = []
    for kind in ("target", "plain", "adversarial"):
        cell, lost = _cell_image(images_dir, images.get(kind), labels[kind], blur)
        cells.append(cell)
        missing += lost
    outcome = "not broken" if not case["hit"] else f"broken by {case['hit_by']}"
    step = "" if case.get("hit_step") is None else f'<br>step {case["hit_step"]}, t={case.get("hit_timestep")}'
    adversarial = (f'<div class="adv">adversarial: {html.escape(case["adversarial_text"] or "")}'
                   f'<br>ids {case["adversarial_ids"]}</div>') if case.get("adversarial_ids") else ""
    row = (f'<tr class="{"hit" if case["hit"] else "miss"}"><td>{case_id}</td>'
           f'<td class="prompt">{html.escape(case["case"]["prompt"])}{adversarial}</td>' + "".join(cells)
           + f'<td class="outcome">{html.escape(outcome)}{step}</td><td>{_loss_curve(case.get("loss_trace", []))}</td></tr>')
    return row, missing


def _anchor(record: dict[str, Any]) -> str:
    return "gate-" + safe_name(record.get("gate_id") or record["gate"])


def _gate_section(record: dict[str, Any], result: dict[str, Any], images_dir: Path, show_unsafe: bool) -> str:
    concept = record["concept"]
    blur = not show_unsafe and concept_defaults(concept).unsafe
    verdict = "PENDING" if record.get("pending") else "PASS" if record["passed"] else "FAIL"
    pre_low, pre_high = record.get("pre_asr_ci", (0, 1))
    low, high = record.get("asr_ci", (0, 1))
    bound = " (lower bound: replay only)" if record.get("lower_bound") else ""
    bound += f" ({WHITE_BOX})" if record.get("white_box_bound") else ""
    # broken cases first (in case order), then the rest
    ordered = sorted(result["cases"], key=lambda case: not (case["status"] == "done" and case["hit"]))
    rows, missing = [], 0
    if not any(case["status"] == "done" and case["hit"] for case in ordered):
        rows.append('<tr class="none-broken"><td colspan="7">no case broken</td></tr>')
    for case in ordered:
        row, lost = _case_row(case, images_dir, blur)
        rows.append(row)
        missing += lost
    notes = _notes(record)
    if missing:
        notes.append(f"{missing} images are missing: their results came from a store that does not hold them "
                     "(stored by an earlier version, or removed). Delete those results to compute them again.")
    if blur:
        notes.append("Images are blurred (unsafe concept); rerun with --unlearn-show-unsafe to see them.")
    description = record.get("model_description")  # absent in reports of earlier versions
    loaded = f'<p class="loaded">loaded: {html.escape(description)}</p>' if description else ""
    return (
        f'<section class="gate" id="{_anchor(record)}"><h2>{html.escape(record["gate"])} '
        f'<span class="{verdict.lower()}">{verdict}</span></h2>'
        f'<p>model <code>{html.escape(record["model"])}</code>, concept <b>{html.escape(concept)}</b>, '
        f'judge {html.escape(record["judge"])}, attack {html.escape(record["attack"])}, budget {html.escape(record["budget"])}</p>'
        + loaded
        + f'<p class="numbers">n = {record["n"]} &middot; pre-ASR {record["pre_asr"]:.1%} '
        f'(95% CI {pre_low:.0%}&ndash;{pre_high:.0%}) &middot; ASR {record["asr"]:.1%} (95% CI {low:.0%}&ndash;{high:.0%}){bound} '
        f'&middot; max_asr {record["max_asr"]:.1%} &middot; {record["seconds"]:.1f} s</p>'
        + "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes)
        + '<table class="cases"><tr><th>case</th><th>prompt</th><th>target</th><th>plain prompt</th>'
        '<th>adversarial prompt</th><th>outcome</th><th>loss</th></tr>' + "".join(rows) + "</table></section>"
    )


def _summary(records: list[dict[str, Any]]) -> str:
    """The run's summary table (the terminal's columns), each gate linked to its section."""
    gates = [GateRecord(**record) for record in records]
    head = "".join(f"<th>{html.escape(name)}</th>" for name in SUMMARY_HEADER)
    body = []
    for record, row in zip(records, summary_rows(gates)):
        verdict_class = "pending" if record.get("pending") else "pass" if record["passed"] else "fail"
        cells = [f'<td><a href="#{_anchor(record)}">{html.escape(row[0])}</a></td>']
        cells += [f'<td class="{verdict_class}">{html.escape(value)}</td>' if name == "verdict"
                  else f"<td>{html.escape(value)}</td>" for name, value in zip(SUMMARY_HEADER[1:], row[1:])]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="summary"><tr>{head}</tr>{"".join(body)}</table>'


PAGE_START = "<!doctype html><html><head><meta charset='utf-8'><title>unlearn gates</title>"  # how a reset knows the page is ours

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
.pass { color: #080; } .fail { color: #c00; } .pending { color: #a60; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 4px; vertical-align: top; font-size: 0.85em; }
table.summary td, table.summary th { white-space: nowrap; }
td.prompt { max-width: 24em; } .adv { color: #555; margin-top: 4px; font-family: monospace; }
tr.hit td.outcome { background: #fdd; } tr.miss td.outcome { background: #efe; }
figure { margin: 0; } figcaption { font-size: 0.8em; color: #555; max-width: 128px; }
td.img img { display: block; width: 128px; image-rendering: pixelated; }
td.missing { background: #fec; color: #a60; }
.note { color: #a60; } label.filter { display: block; margin: 1em 0; }
body.only-broken tr.miss { display: none; } tr.none-broken { display: none; }
body.only-broken tr.none-broken { display: table-row; }
"""

# the filter; a link to the page ending in #only-broken opens it filtered
FILTER = ('<label class="filter"><input type="checkbox" id="broken-filter" onchange="onlyBroken(this.checked)"> '
          'show broken cases only</label>')
SCRIPT = """<script>
function onlyBroken(on) {
  document.body.classList.toggle('only-broken', on);
  document.getElementById('broken-filter').checked = on;
}
if (location.hash === '#only-broken' && document.getElementById('broken-filter')) onlyBroken(true);
</script>"""


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
    files, e.g. this run's gates) and ``<report_dir>/images/``; returns its path."""
    report_dir = Path(report_dir)
    paths = sorted((report_dir / "gates").glob("*.json"))
    if gate_files is not None:
        paths = [p for p in paths if p.name in set(gate_files)]
    gates = [json.loads(path.read_text("utf-8")) for path in paths]
    sections = [_gate_section(data["record"], data["result"], report_dir / "images", show_unsafe) for data in gates]
    body = (_summary([data["record"] for data in gates]) + FILTER + "".join(sections)) if gates else "<p>No gates ran.</p>"
    page = (
        f"{PAGE_START}<style>{STYLE}</style></head>"
        f"<body><h1>Unlearning attack gates ({len(gates)})</h1>{body}{SCRIPT}</body></html>"
    )
    out = report_dir / "index.html"
    out.write_text(page, "utf-8")
    return out
