"""The outputs of ``spade-eval run``: ``eval.json``, the results page ``index.html`` and its images, console lines.

:func:`write_results` turns an :class:`~train_job.eval_inputs.EvalPlan` and the pipeline's
:class:`~train_job.eval_inputs.EvalResult` into ``OUT/eval.json`` (:func:`result_record`),
``OUT/index.html`` (:func:`results_page`) and ``OUT/images/<set>/<key>.png`` (``label``
colourised, ``real``, each generated set); :func:`summary_lines` is the console's summary.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spade_core.locations import absolute
from spade_core.metrics.kid import KID_SEED

from .eval_inputs import LABEL, REAL, EvalPlan, EvalResult

FORMAT_VERSION = 1
RESULT_FILE = "eval.json"
PAGE_FILE = "index.html"
IMAGES_DIR = "images"
Z_NOTES = {
    "generated": "the model has no style encoder: no z",
    "style": "z = mu of the style encoder on the real image (deterministic; the reference samples around mu at test time)",
    "random": "z ~ N(0, I), drawn per image from spade_core.seeds.rng(seed, key) (numpy default_rng([seed, crc32(key)]))",
}


def result_record(plan: EvalPlan, result: EvalResult, *, command: Sequence[str] | None = None) -> dict[str, Any]:
    """The content of ``eval.json``."""
    opts = plan.options
    labels = plan.shards.labels
    h, w = plan.resolution
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": list(command) if command is not None else None,
        "checkpoint": plan.checkpoint,
        "data": {
            "shards": absolute(opts.data),
            "split": plan.split,
            "split_count": plan.shards.count,
            "labels": dataclasses.asdict(labels),
        },
        "num_images": plan.num_images,
        "resolution": {"height": h, "width": w},
        "preprocess": dataclasses.asdict(plan.preprocess),
        "real_images": "the split's images after that preprocessing (the model's input size), through the same pipeline",
        "sets": {name: Z_NOTES[name] for name in plan.sets},
        "seeds": {"seed": opts.seed, "kid": KID_SEED},
        "precision": {"generator": opts.precision, "inception": "fp32", "segmenter": "fp32"},
        "inception": plan.inception,
        "segmenter": plan.segmenter,
        "label_space": {"num_classes": plan.space.num_classes, "ignore_ids": list(plan.space.ignore_ids)},
        "metrics": result.metrics,
        "notes": plan.notes,
        "ray": result.ray,
        "wall_time_s": {
            "total": round(time.monotonic() - plan.started, 3),
            "pipeline": round(result.pipeline_s, 3),
            "metrics": round(result.metrics_s, 3),
            "images_per_s": round(plan.num_images / result.pipeline_s, 3) if result.pipeline_s > 0 else None,
        },
    }


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _file_names(keys: Sequence[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    taken: set[str] = set()
    for i, key in enumerate(keys):
        name = _UNSAFE.sub("_", key)[:120] or "image"
        if name in taken:
            name = f"{name}_{i}"
        taken.add(name)
        names[key] = f"{name}.png"
    return names


def write_results(plan: EvalPlan, result: EvalResult, *, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Write ``eval.json``, ``index.html`` and the page's PNGs under ``plan.options.out``; returns the record."""
    out = Path(plan.options.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = (LABEL, *plan.sets, REAL)
    for name in (LABEL, REAL, "generated", "style", "random"):  # an earlier run's images: ours to replace
        for old in (out / IMAGES_DIR / name).glob("*.png"):
            old.unlink()
    keys = [k for k in plan.sample_keys if k in result.samples]
    files = _file_names(keys)
    for key in keys:
        for name in columns:
            target = out / IMAGES_DIR / name / files[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(result.samples[key][name])).save(target)
    record = result_record(plan, result, command=command)
    record["samples"] = {"keys": keys, "images": {name: f"{IMAGES_DIR}/{name}/" for name in columns}}
    _atomic_text(out / RESULT_FILE, json.dumps(record, indent=2) + "\n")
    _atomic_text(out / PAGE_FILE, results_page(record, keys, files, columns))
    return record


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_page(record: dict[str, Any], keys: Sequence[str], files: dict[str, str], columns: Sequence[str]) -> str:
    """A static HTML page: the metrics, then one row per sampled key: colourised label | generated | real."""
    e = html.escape
    metric_rows = []
    for name, m in record["metrics"].items():
        kid = m.get("kid")
        kid_text = f"{kid['mean']:.5f} &plusmn; {kid['std']:.5f}" if kid else "-"
        metric_rows.append(
            f"<tr><td>{e(name)}</td><td>{_fmt(m.get('fid'), 3)}</td><td>{kid_text}</td>"
            f"<td>{_fmt(m.get('miou'))}</td><td>{_fmt(m.get('pixel_accuracy'))}</td></tr>"
        )
    ckpt = record["checkpoint"]
    inc = record["inception"]
    used = record["segmenter"]
    inception_text = "none"
    if inc:
        foreign = "" if inc["official"] else ", NOT pytorch-fid&#39;s weights"
        inception_text = f"{e(inc['path'])} (sha256 {inc['sha256'][:12]}{foreign}), {inc['dims']} dims"
    segmenter_text = "none"
    if used:
        segmenter_text = e(used["kind"]) + (f" {e(used['path'])} (sha256 {used['sha256'][:12]})" if used.get("path") else "")
    facts = [
        f"checkpoint {e(ckpt['path'])} (sha256 {ckpt['sha256'][:12]})",
        f"{record['num_images']} images of the {e(record['data']['split'])} split of {e(str(record['data']['shards']))}, "
        f"{record['resolution']['width']}x{record['resolution']['height']}, generator {e(record['precision']['generator'])}",
        f"Inception: {inception_text}",
        f"segmenter: {segmenter_text}",
        *[e(n) for n in record["notes"]],
    ]
    head = "".join(f"<th>{e(c)}</th>" for c in ("key", *columns))
    rows = "".join(
        f"<tr><td class=key>{e(k)}</td>"
        + "".join(f'<td><img src="{IMAGES_DIR}/{c}/{files[k]}" alt="{e(c)}"></td>' for c in columns)
        + "</tr>\n"
        for k in keys
    )
    title = f"spade-eval: {Path(ckpt['path']).name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}} td,th{{padding:4px 8px;border:1px solid #ccc}}
.samples img{{width:192px;image-rendering:pixelated}} .key{{font-family:monospace;font-size:small}}</style></head>
<body><h1>{e(title)}</h1>
<table><tr><th>set</th><th>FID</th><th>KID</th><th>mIoU</th><th>pixel accuracy</th></tr>
{''.join(metric_rows)}</table>
<ul>{''.join(f'<li>{f}</li>' for f in facts)}</ul>
<p>Details in <a href="{RESULT_FILE}">{RESULT_FILE}</a>. The real row's mIoU is the segmenter on the real images:
the ceiling for the generated ones.</p>
<table class=samples><tr>{head}</tr>
{rows}</table>
</body></html>
"""


def summary_lines(record: dict[str, Any]) -> list[str]:
    """One line per image set for the console."""
    lines = []
    for name, m in record["metrics"].items():
        parts = []
        if "fid" in m:
            parts.append(f"FID {m['fid']:.3f}  KID {m['kid']['mean']:.5f} +- {m['kid']['std']:.5f}")
        if "miou" in m:
            parts.append(f"mIoU {m['miou']:.4f}  pixel accuracy {m['pixel_accuracy']:.4f}")
        if parts:
            lines.append(f"{name}: " + "  ".join(parts))
    return lines
