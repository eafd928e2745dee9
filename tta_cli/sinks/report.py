"""``tta report RUN_DIR``: one self-contained HTML page (charts and thumbnails embedded) and PNGs.

Reads only the run's ``predictions.csv`` and ``run.json`` (and the images, found from the inputs
recorded in ``run.json``; the class names from the exported ``model/config.json`` or the model
folder the run used). Shows first the verdict with its reasons and the accuracy before and after
adaptation, then along the stream, in windows of one batch: mean entropy, the share
used for updates, accuracy where labels exist, the share of the window's most frequent predicted
class (a collapse shows as a window that is nearly all one class), with the method's resets marked;
the predicted-class histogram of the adapted run against the source model's; the images whose
prediction adaptation changed; the configuration.

The source model's predictions come from a ``source_pred`` column of ``predictions.csv`` where the
run wrote one; without it the report shows the adapted run alone and says so.

Entropy is in nats (natural log), as in ``predictions.csv`` and the run's summary. The charts have
axis titles and "nice" ticks (1, 2 or 5 times a power of ten; whole numbers for counts).

The charts are drawn with Pillow (a core dependency): each is written as a PNG and the same bytes
are embedded in the page, so the report needs no plotting library and no network to view.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from tta_cli.errors import TTAError
from tta_cli.ownership import record_path
from tta_cli.sinks.charts import ADAPTED, SOURCE, Series, bar_chart, line_chart

MAX_CHANGED_THUMBNAILS = 60
MAX_HISTOGRAM_CLASSES = 30
THUMBNAIL_PX = 96
COLLAPSE_SHARE = 0.8
"""A window whose most frequent predicted class has at least this share is marked."""

VERDICTS = {
    "ok": "predictions changed, with no sign of collapse",
    "no-change": "almost no prediction changed",
    "suspect": "adaptation may have hurt, see the verdict's reasons",
    "hurt": "the label-free estimate says adaptation lost accuracy",
    "collapsed": "predictions collapsed onto few classes",
}
"""What each label-free verdict (``tta_cli.monitor.health_verdict``) means, for the summary and the page."""

@dataclass
class Report:
    html: Path
    pngs: list[Path]


# --- reading the run ---------------------------------------------------------------------------


def read_run(run_dir: Path) -> tuple[list[dict[str, str]], dict[str, Any]]:
    predictions, record = run_dir / "predictions.csv", run_dir / "run.json"
    try:
        run = json.loads(record.read_text()) if record.is_file() else {}
    except json.JSONDecodeError as err:
        raise TTAError(f"{record} is not valid JSON: {err.msg}") from err
    if not predictions.is_file() and (run_dir / "predictions.jsonl").is_file():
        return _jsonl_rows(run_dir / "predictions.jsonl"), run
    if not predictions.is_file():
        raise TTAError(f"no predictions.csv in {run_dir}", "pass the --out folder of a `tta adapt` run")
    with predictions.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "pred" not in reader.fieldnames:
            raise TTAError(f"{predictions} has no 'pred' column", "is it a tta predictions file?")
        rows = list(reader)
    return rows, run


def _jsonl_rows(path: Path) -> list[dict[str, str]]:
    """``--format jsonl`` predictions as the CSV's text cells (top-5 space-separated, null empty)."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TTAError(f"{path} line {number} is not valid JSON: {err.msg}") from err
            rows.append({k: "" if v is None else " ".join(map(str, v)) if isinstance(v, list) else str(v)
                         for k, v in record.items()})
    return rows


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def window_size(rows: list[dict[str, str]], run: dict[str, Any]) -> int:
    batch = (run.get("config") or {}).get("batch_size")
    size = int(batch) if isinstance(batch, int) and batch > 0 else 64
    return max(1, min(size, max(1, len(rows) // 4)))  # at least four points on a short stream


def windows(rows: list[dict[str, str]], size: int) -> list[list[dict[str, str]]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def stream_series(rows: list[dict[str, str]], size: int) -> dict[str, Series]:
    """Per-window means along the stream; x is the position of the window's last image."""
    out: dict[str, Series] = {k: Series(k, [], []) for k in ("entropy", "used", "accuracy", "top_class")}
    end = 0
    for chunk in windows(rows, size):
        end += len(chunk)
        entropy = [v for v in (_float(r.get("entropy")) for r in chunk) if v is not None]
        if entropy:
            out["entropy"].xs.append(end)
            out["entropy"].ys.append(sum(entropy) / len(entropy))
        used = [v for v in (_int(r.get("used_for_update")) for r in chunk) if v is not None]
        if used:
            out["used"].xs.append(end)
            out["used"].ys.append(sum(used) / len(used))
        correct = [v for v in (_int(r.get("correct")) for r in chunk) if v is not None]
        if correct:
            out["accuracy"].xs.append(end)
            out["accuracy"].ys.append(sum(correct) / len(correct))
        counts = Counter(r["pred"] for r in chunk)
        out["top_class"].xs.append(end)
        out["top_class"].ys.append(counts.most_common(1)[0][1] / len(chunk))
    return out


def source_series(rows: list[dict[str, str]], size: int) -> Series | None:
    """Accuracy of the source model's predictions along the stream, where both columns exist."""
    if not rows or "source_pred" not in rows[0]:
        return None
    series = Series("source", [], [], SOURCE)
    end = 0
    for chunk in windows(rows, size):
        end += len(chunk)
        pairs = [(r["source_pred"], r["label"]) for r in chunk
                 if r.get("label", "") != "" and r["source_pred"] != ""]  # empty: not referenced
        if pairs:
            series.xs.append(end)
            series.ys.append(sum(p == y for p, y in pairs) / len(pairs))
    return series if series.xs else None


def reset_positions(run: dict[str, Any]) -> list[int]:
    """Image positions of the method's resets (``resets_at_batch`` times the batch size)."""
    batch = (run.get("config") or {}).get("batch_size") or 0
    return [int(b) * int(batch) for b in run.get("resets_at_batch") or [] if isinstance(b, int)]


def class_names(rows: list[dict[str, str]], run: dict[str, Any] | None = None,
                run_dir: Path | None = None) -> dict[str, str]:
    """Class index (as text) -> readable name: from the model's config where the run's folder or
    its model folder has one (every class, the labels' too), else from the predicted names."""
    names = _model_class_names(run or {}, run_dir)
    for r in rows:
        names.setdefault(r["pred"], r.get("pred_name") or r["pred"])
    if rows and "source_pred_name" in rows[0]:
        for r in rows:
            names.setdefault(r["source_pred"], r.get("source_pred_name") or r["source_pred"])
    return names


def _model_class_names(run: dict[str, Any], run_dir: Path | None) -> dict[str, str]:
    """The class names in a timm ``config.json``: the exported ``model/`` of the run, else the
    ``local-dir:`` folder it ran."""
    spec = str((run.get("model") or {}).get("spec") or (run.get("config") or {}).get("model") or "")
    folders = [run_dir / "model"] if run_dir is not None else []
    if spec.startswith("local-dir:"):
        folders.append(Path(spec.removeprefix("local-dir:")))
    for folder in folders:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        labels = config.get("label_descriptions") or config.get("label_names") if isinstance(config, dict) else None
        if isinstance(labels, list) and labels:
            return {str(i): str(name) for i, name in enumerate(labels)}
        if isinstance(labels, dict) and labels:  # timm also writes {name: description}
            return {str(i): str(name) for i, name in enumerate(labels.values())}
    return {}


def short_name(name: str, limit: int = 22) -> str:
    """A class name for a chart axis: the first of its synonyms (ImageNet's "tench, Tinca tinca"),
    at most ``limit`` characters."""
    name = name.split(",")[0].strip() or name
    return name if len(name) <= limit else name[:limit - 1] + "…"


def changed_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    if not rows or "source_pred" not in rows[0]:
        return []
    return [r for r in rows if r["source_pred"] != "" and r["source_pred"] != r["pred"]]


def histogram_chart(rows: list[dict[str, str]], names: dict[str, str]) -> tuple[Image.Image, str]:
    adapted = Counter(r["pred"] for r in rows)
    has_source = bool(rows) and "source_pred" in rows[0]
    source = Counter(r["source_pred"] for r in rows if r["source_pred"] != "") if has_source else Counter()
    classes = sorted(set(adapted) | set(source), key=lambda c: (-(adapted[c] + source[c]), _int(c) or 0, c))
    shown = classes[:MAX_HISTOGRAM_CLASSES]
    note = "" if len(classes) <= len(shown) else f" (the {len(shown)} most frequent of {len(classes)} classes)"
    groups = [("adapted", [adapted[c] for c in shown], ADAPTED)]
    if has_source:
        groups.append(("source model", [source[c] for c in shown], SOURCE))
    title = "predicted classes" + note
    return bar_chart(title, [short_name(names.get(c, c)) for c in shown], groups), note


# --- images ------------------------------------------------------------------------------------


def image_path(key: str, run: dict[str, Any], run_dir: Path) -> Path | None:
    """Where a prediction's image is: the key relative to an input folder, the input itself, or the
    key as a path (absolute, or relative to the run folder's parent or the working folder)."""
    inputs = [Path(p) for p in (run.get("config") or {}).get("inputs") or []]
    candidates = [Path(key)]
    for given in inputs:
        if given.is_dir():
            candidates.append(given / key)
        elif given.name == key:
            candidates.append(given)
        else:
            candidates.append(given.parent / key)  # a list file's entries are relative to it
    candidates.append(run_dir.parent / key)
    return next((c for c in candidates if c.is_file()), None)


def thumbnail_data_uri(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            if max(image.size) < THUMBNAIL_PX:  # small images (CIFAR's 32 px): enlarged, pixels kept
                scale = THUMBNAIL_PX // max(image.size)
                image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
            return _data_uri(image, "JPEG")
    except (OSError, ValueError):
        return None


def _data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


# --- the page ----------------------------------------------------------------------------------


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1000px;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse} td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}
img.chart{max-width:100%} .note{color:#666}
.grid{display:flex;flex-wrap:wrap;gap:10px} figure{margin:0;width:130px;font-size:12px}
figure img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#f4f4f4}
.old{color:#ff7f0e} .new{color:#1f77b4} .truth{color:#555}
pre{background:#f6f6f6;padding:10px;overflow:auto;font-size:12px} .verdict{font-size:1.15em}
"""


def _table(pairs: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                               for k, v in pairs) + "</table>"


def _summary(rows: list[dict[str, str]], run: dict[str, Any]) -> list[tuple[str, str]]:
    model, method = run.get("model") or {}, run.get("method") or {}
    pairs = [("model", str(model.get("spec", "?"))), ("method", str(method.get("method", "?"))),
             ("status", str(run.get("status", "?"))), ("images", str(len(rows)))]
    before, after = accuracies(rows)
    if after is not None:
        pairs.append(("accuracy", f"{100 * before:.1f}% -> {100 * after:.1f}% ({100 * (after - before):+.1f}): "
                                  "the model as it was -> adapted" if before is not None
                      else f"{100 * after:.1f}%"))
    if rows and "source_pred" in rows[0]:
        compared = sum(r["source_pred"] != "" for r in rows)
        pairs.append(("predictions changed by adaptation", f"{len(changed_rows(rows))} of {compared}"
                      + (f" compared (a sample of the {len(rows)})" if compared < len(rows) else "")))
    pairs.append(("resets", str(len(run.get("resets_at_batch") or []))))
    state, batches = run.get("method_state") or {}, (run.get("counts") or {}).get("batches", "?")
    fallbacks = state.get("fallback_batches")
    if fallbacks:
        pairs.append(("batches falling back towards the source", f"{len(fallbacks)} of {batches} (first: batch "
                      f"{fallbacks[0]['batch']}, {', '.join(fallbacks[0]['left_out'])} left out: "
                      f"{fallbacks[0]['reason']})"))
    lame = state.get("lame_batches")
    if lame:
        pairs.append(("batches predicted by LAME (few classes per batch)",
                      f"{sum(last - first for first, last in lame)} of {batches} (first: batch {lame[0][0]})"))
    restarts = state.get("domain_changes")
    if restarts:
        pairs.append(("restarts from the source model where the input changed",
                      f"{len(restarts)}, {batch_list(restarts, shown=20)}"))
    return pairs


def batch_list(batches: list[int], shown: int = 5) -> str:
    """``at batch 3``, ``at batches 3, 9 and 14``: the first ``shown``, then how many more."""
    words = [str(b) for b in batches[:shown]]
    last = f"{len(batches) - shown} more" if len(batches) > shown else words.pop()
    return f"at batch{'es' if len(batches) > 1 else ''} {', '.join(words)}{' and ' if words else ''}{last}"


def accuracies(rows: list[dict[str, str]]) -> tuple[float | None, float | None]:
    """(the source model's, the run's) accuracy over the labelled rows; None where unknown."""
    labelled = [r for r in rows if r.get("label", "") != ""]
    correct = [v for v in (_int(r.get("correct")) for r in labelled) if v is not None]
    after = sum(correct) / len(correct) if correct else None
    if not labelled or "source_pred" not in rows[0]:
        return None, after
    compared = [r for r in labelled if r["source_pred"] != ""]  # a sampled reference leaves rows empty
    return (sum(r["source_pred"] == r["label"] for r in compared) / len(compared) if compared else None), after


def _verdict(run: dict[str, Any]) -> str:
    """The label-free verdict, its reasons and any estimate the run recorded, as the page's head."""
    health = run.get("health") or {}
    if (run.get("config") or {}).get("predict_only"):
        return "<p class='verdict'>Predictions of the model as it is, without adapting.</p>"
    if not health:
        return "<p class='note'>This run recorded no verdict.</p>"
    reasons = "".join(f"<li>{html.escape(str(r))}</li>" for r in health.get("reasons") or [])
    estimates = "".join(f"<li>{html.escape(k.replace('_', ' '))}: {html.escape(_plain_value(v))}</li>"
                        for k, v in health.items() if k.startswith("estimate"))
    verdict = str(health.get("verdict", "?"))
    advice = f"<p class='verdict'>What to do: {html.escape(health['advice'])}</p>" if health.get("advice") else ""
    return (f"<p class='verdict'>Verdict: <b>{html.escape(verdict)}</b>, {html.escape(VERDICTS.get(verdict, ''))} "
            f"<span class='note'>(no labels needed)</span></p><ul>{reasons}{estimates}</ul>{advice}")


def _plain_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain_value(v)}" for k, v in value.items())
    return str(value)


def _figure(row: dict[str, str], run: dict[str, Any], run_dir: Path, names: dict[str, str]) -> str:
    key = row.get("path", "")
    uri = None if "#frame=" in key else thumbnail_data_uri(image_path(key, run, run_dir))
    picture = f'<img src="{uri}" alt="">' if uri else '<div class="note">(image not found)</div>'
    old = html.escape(names.get(row["source_pred"], row["source_pred"]))
    new = html.escape(names.get(row["pred"]) or row.get("pred_name") or row["pred"])
    truth = ""
    if row.get("label", "") != "":
        truth = f'<br><span class="truth">label: {html.escape(names.get(row["label"], row["label"]))}</span>'
    return (f'<figure>{picture}<figcaption>{html.escape(key)}<br><span class="old">source: {old}</span>'
            f'<br><span class="new">adapted: {new}</span>{truth}</figcaption></figure>')


def render(rows: list[dict[str, str]], run: dict[str, Any], run_dir: Path, out: Path) -> Report:
    record_path(out)  # a run folder lists report/ as tta's, for --overwrite (tta_cli.ownership)
    out.mkdir(parents=True, exist_ok=True)
    size = window_size(rows, run)
    series = stream_series(rows, size)
    resets = reset_positions(run)
    names = class_names(rows, run, run_dir)
    charts: list[tuple[str, Image.Image, str]] = [
        ("entropy", line_chart(f"mean prediction entropy (windows of {size} images)", [series["entropy"]],
                               events=resets, y_title="entropy (nats)"), ""),
        ("used", line_chart("share of images used for updates", [series["used"]], (0.0, 1.0), resets,
                            percent=True, y_title="used"), ""),
        ("top_class", line_chart(f"share of the most frequent predicted class per window (marked line: "
                                 f"{COLLAPSE_SHARE:.0%}, a possible collapse)", [series["top_class"]], (0.0, 1.0),
                                 resets, percent=True, threshold=COLLAPSE_SHARE, y_title="top class"), ""),
    ]
    if series["accuracy"].xs:
        lines = [Series("adapted", series["accuracy"].xs, series["accuracy"].ys, ADAPTED)]
        source = source_series(rows, size)
        if source is not None:
            lines.append(Series("source model", source.xs, source.ys, SOURCE))
        charts.insert(0, ("accuracy", line_chart(f"accuracy (windows of {size} images)", lines, (0.0, 1.0),
                                                 resets, percent=True, y_title="accuracy"), ""))
    histogram, _ = histogram_chart(rows, names)
    charts.append(("classes", histogram, ""))
    pngs = []
    for name, image, _ in charts:
        path = out / f"{name}.png"
        image.save(path)
        pngs.append(path)
    page = _page(rows, run, run_dir, names, charts, size, resets)
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return Report(html_path, pngs)


def _page(rows: list[dict[str, str]], run: dict[str, Any], run_dir: Path, names: dict[str, str],
          charts: list[tuple[str, Image.Image, str]], size: int, resets: list[int]) -> str:
    has_source = bool(rows) and "source_pred" in rows[0]
    collapsed = sum(y >= COLLAPSE_SHARE for y in stream_series(rows, size)["top_class"].ys)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tta report: {html.escape(run_dir.name)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>tta report: {html.escape(str(run_dir))}</h1>", _verdict(run), _table(_summary(rows, run)),
             "<h2>Along the stream</h2>"]
    if resets:
        parts.append(f"<p>Red vertical lines: the method's {len(resets)} resets (after a collapse was detected).</p>")
    if collapsed:
        parts.append(f"<p>{collapsed} windows are at least {COLLAPSE_SHARE:.0%} one predicted class.</p>")
    for name, image, _ in charts:
        if name == "classes":
            parts.append("<h2>Predicted classes</h2>")
            if not has_source:
                parts.append("<p class='note'>This run has no source-model predictions (no source_pred column in "
                             "predictions.csv): only the adapted run's classes are shown.</p>")
        parts.append(f'<img class="chart" alt="{name}" src="{_data_uri(image)}">')
    parts.append("<h2>Images whose prediction adaptation changed</h2>")
    changed = changed_rows(rows)
    if not has_source:
        parts.append("<p class='note'>Not available: the run did not record the source model's predictions.</p>")
    elif not changed:
        parts.append("<p>None: every prediction equals the source model's.</p>")
    else:
        shown = changed[:MAX_CHANGED_THUMBNAILS]
        if len(shown) < len(changed):
            parts.append(f"<p>The first {len(shown)} of {len(changed)}, in stream order.</p>")
        parts.append('<div class="grid">' + "".join(_figure(r, run, run_dir, names) for r in shown) + "</div>")
    config = {k: run[k] for k in ("config", "method", "model", "preprocessing", "versions", "device") if k in run}
    parts += ["<h2>Configuration (run.json)</h2>", f"<pre>{html.escape(json.dumps(config, indent=2))}</pre>",
              "</body></html>"]
    return "\n".join(parts)


def write_report(run_dir: Path, out: Path | None = None) -> Report:
    """The report of the run in ``run_dir``, written to ``out`` (default ``RUN_DIR/report``)."""
    rows, run = read_run(run_dir)
    if not rows:
        raise TTAError(f"{run_dir / 'predictions.csv'} has no predictions", "the run made none")
    return render(rows, run, run_dir, out if out is not None else run_dir / "report")
