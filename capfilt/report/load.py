"""Read what a run folder holds, tolerating every missing or broken part.

Five kinds of folder are understood (:func:`folder_kind`):

- ``run``: a ``capfilt bootstrap`` or ``capfilt demo`` folder: ``summary.json``,
  ``runs/<stage>/metrics.jsonl``, ``data/web_filtered/*.parquet`` (one row per text: score and
  decision), ``data/web_captioned/`` shards, and ``round_r/`` with the same for later rounds;
- ``filter``: one filter stage's output (its parquet, kept shards and ``summary.json``);
- ``caption``: one caption stage's output (shards with the synthetic captions);
- ``shards``: shards another stage wrote (an import's, the built-in benchmark's): their images;
- ``training``: one training run folder (``metrics.jsonl``).

A stage may have been skipped or still be running, so each loader returns ``None`` or an empty
value and records a human-readable note in ``RunData.missing`` instead of raising.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from capfilt.data.writer import STATS_SUFFIX, drop_skipped_rows, read_done_marker

RUN_NAMES = ("pretrain_baseline", "captioner", "filter", "pretrain_capfilt")
"""The demo's training runs, in pipeline order (other run folders found are shown after these)."""

TEXT_COLUMNS = ("uid", "origin", "text", "itm_score", "kept")
"""Parquet columns the report needs from ``data/web_filtered``."""

RUN_MARKERS = ("manifest.json", "recipe.json", "stages")
"""What a bootstrap or demo folder holds from its first seconds on (a folder that merely has a
``runs/`` or ``data/`` is a user's own layout, e.g. ``runs/pre`` beside ``web_captioned/``)."""

KIND_NAMES = {
    "run": "a bootstrap or demo run",
    "filter": "a filter stage output",
    "caption": "a caption stage output",
    "shards": "shards no caption or filter stage wrote",
    "training": "a training run",
}
"""How the report and its errors name each kind of folder :func:`folder_kind` tells apart."""

MAX_METRIC_LINES = 200_000
"""Cap on metrics lines read per run: a report of a huge run should still render quickly."""


@dataclass
class RunData:
    run_dir: Path
    kind: str = "run"
    released: bool = False
    """A bootstrap run of released models (``--captioner``/``--filter``): no baseline, no
    fine-tunes; a pretrain only with ``--pretrain-after``."""
    filtered_dir: Path | None = None
    captioned_dir: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    texts: pd.DataFrame | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def filtered_label(self) -> str:
        return folder_label(
            self.filtered_dir or self.run_dir / "data" / "web_filtered", self.run_dir
        )

    @property
    def captioned_label(self) -> str:
        return folder_label(
            self.captioned_dir or self.run_dir / "data" / "web_captioned", self.run_dir
        )

    def section(self, key: str) -> dict[str, Any]:
        """``summary[key]`` when it is a dict, else ``{}``."""
        value = self.summary.get(key)
        return value if isinstance(value, dict) else {}


def folder_label(folder: Path, run_dir: Path) -> str:
    """How the report names a folder it reads: its path inside the run folder
    (``data/web_filtered``), or a stage folder's own name when the report is of it alone."""
    try:
        inside = folder.relative_to(run_dir).as_posix()
    except ValueError:
        return str(folder)
    return inside if inside != "." else run_dir.name


def load_summary(run_dir: Path, missing: list[str]) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        missing.append("summary.json not found: the run has not finished (tables are left empty)")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        missing.append(f"summary.json unreadable ({err})")
        return {}
    if not isinstance(data, dict):
        missing.append("summary.json is not a JSON object")
        return {}
    return data


def _clean_row(row: Any) -> dict[str, Any] | None:
    if not isinstance(row, dict):
        return None
    step = row.get("step")
    if not isinstance(step, int | float) or isinstance(step, bool) or not math.isfinite(step):
        return None
    return row


def load_metrics(
    run_dir: Path, missing: list[str], expected: tuple[str, ...] = RUN_NAMES
) -> dict[str, list[dict[str, Any]]]:
    """Per run name, the metrics rows with a numeric ``step`` (broken lines are skipped); the
    ``expected`` runs that are absent are noted."""
    runs_dir = run_dir / "runs"
    found = (
        sorted(p.name for p in runs_dir.iterdir() if (p / "metrics.jsonl").is_file())
        if runs_dir.is_dir()
        else []
    )
    names = [n for n in RUN_NAMES if n in found] + [n for n in found if n not in RUN_NAMES]
    out: dict[str, list[dict[str, Any]]] = {}
    for name in expected:
        if name not in found:
            missing.append(f"runs/{name}/metrics.jsonl not found: no loss curve for {name}")
    for name in names:
        rows, bad = [], 0
        try:
            with open(runs_dir / name / "metrics.jsonl", encoding="utf-8", errors="replace") as fh:
                for i, line in enumerate(fh):
                    if i >= MAX_METRIC_LINES:
                        break
                    if not line.strip():
                        continue
                    try:
                        row = _clean_row(json.loads(line))
                    except ValueError:  # a line cut by a running job, or garbage
                        row = None
                    if row is None:
                        bad += 1
                    else:
                        rows.append(row)
        except OSError as err:
            missing.append(f"runs/{name}/metrics.jsonl unreadable ({err})")
            continue
        if bad:
            missing.append(f"runs/{name}/metrics.jsonl: {bad} unreadable line(s) skipped")
        out[name] = rows
    return out


def load_texts(
    run_dir: Path, missing: list[str], folder: Path | None = None
) -> pd.DataFrame | None:
    """All per-text rows of ``data/web_filtered/*.parquet`` (or of ``folder``; files lacking the
    needed columns skipped)."""
    folder = run_dir / "data" / "web_filtered" if folder is None else folder
    label = folder_label(folder, run_dir)
    paths = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not paths:
        missing.append(
            f"{label}/*.parquet not found: no ITM score histograms or per-text decisions"
        )
        return None
    tables = []
    for path in paths:
        try:
            table = drop_skipped_rows(pd.read_parquet(path))
        except Exception as err:  # pyarrow raises several types for a damaged file
            missing.append(f"{label}/{path.name} unreadable ({type(err).__name__})")
            continue
        lacking = [c for c in TEXT_COLUMNS if c not in table.columns]
        if lacking:
            missing.append(f"{label}/{path.name} lacks column(s) {', '.join(lacking)}: skipped")
            continue
        tables.append(table)
    if not tables:
        return None
    table = pd.concat(tables, ignore_index=True)
    table["itm_score"] = pd.to_numeric(table["itm_score"], errors="coerce")
    table["kept"] = table["kept"].fillna(False).astype(bool)
    table["origin"] = table["origin"].astype(str)
    table["text"] = table["text"].astype(str)
    table["uid"] = table["uid"].astype(str)
    return table


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def fill_from_folder(run_dir: Path, summary: dict[str, Any]) -> None:
    """Fill what a run still in progress lacks in ``summary`` from the demo's side files:
    recipe name and seed (``recipe.json``), stage timings (``stages/*.json``) and sample counts
    (``data/*/sizes.json``)."""
    recipe = _read_json(run_dir / "recipe.json")
    recipe = recipe.get("recipe") if isinstance(recipe, dict) else None
    if isinstance(recipe, dict):
        for key, field_name in (("recipe", "name"), ("seed", "seed")):
            if key not in summary and isinstance(recipe.get(field_name), str | int):
                summary[key] = recipe[field_name]
    if not isinstance(summary.get("timings"), dict) and (run_dir / "stages").is_dir():
        timings = {}
        for path in sorted((run_dir / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime):
            marker = _read_json(path)
            if isinstance(marker, dict) and isinstance(marker.get("seconds"), int | float):
                timings[str(marker.get("stage", path.stem))] = marker["seconds"]
        if timings:
            summary["timings"] = timings
    if not isinstance(summary.get("data"), dict) and (run_dir / "data").is_dir():
        counts = {}
        for root in (run_dir, *round_dirs(run_dir)):
            where = "" if root == run_dir else f"{root.name}/"
            data_dir = root / "data"
            for folder in (
                sorted(p for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
            ):
                sizes = _read_json(folder / "sizes.json")
                if isinstance(sizes, dict) and all(isinstance(v, int) for v in sizes.values()):
                    counts[f"{where}{folder.name} images"] = sum(sizes.values())
                for reason, n in sorted(_skipped_inputs(folder).items()):
                    counts[f"{where}{folder.name}: input skipped, {reason}"] = n
        if counts:
            summary["data"] = counts


def _skipped_inputs(folder: Path) -> dict[str, int]:
    """Input samples a stage skipped as bad, per reason, from its shards' done-markers."""
    total: dict[str, int] = {}
    for path in sorted(folder.glob(f"*{STATS_SUFFIX}")):
        marker = _read_json(path)
        skipped = marker.get("skipped") if isinstance(marker, dict) else None
        if isinstance(skipped, dict):
            for reason, n in skipped.items():
                if isinstance(n, int) and n > 0:
                    total[str(reason)] = total.get(str(reason), 0) + n
    return total


def round_dirs(run_dir: Path) -> list[Path]:
    """The folders of a bootstrap run's rounds after the first (``round_2/``, ...), in order."""
    found = [p for p in run_dir.glob("round_*") if p.is_dir() and p.name[6:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[6:]))


def last_round_dir(run_dir: Path) -> Path:
    """Where the last round that wrote its filter's output keeps its data (the run folder
    itself for round 1)."""
    for folder in reversed(round_dirs(run_dir)):
        if (folder / "data" / "web_filtered").is_dir():
            return folder
    return run_dir


def _has_score_tables(folder: Path) -> bool:
    for path in sorted(folder.glob("*.parquet"))[:1]:
        try:
            import pyarrow.parquet as pq

            return "itm_score" in pq.read_schema(path).names
        except Exception:  # a damaged file: not a filter folder we can read
            return False
    return False


def folder_kind(run_dir: Path) -> str:
    """``run``, ``filter``, ``caption``, ``shards``, ``training`` or ``unknown`` (see the module
    doc)."""
    if any((run_dir / name).exists() for name in RUN_MARKERS) or (
        (run_dir / "summary.json").is_file()
        and any((run_dir / name).is_dir() for name in ("runs", "data"))
    ):
        return "run"
    if _has_score_tables(run_dir):
        return "filter"
    if (run_dir / "metrics.jsonl").is_file() or (run_dir / "checkpoints").is_dir():
        return "training"
    if any(run_dir.glob("*.tar")):
        # a caption stage's shards, or others (an import's, the built-in benchmark's, another
        # tool's): the first shard's done-marker names the stage that wrote them
        marker = read_done_marker(run_dir, 0)
        stage = marker.get("stage") if isinstance(marker, dict) else None
        return "caption" if stage == "caption" else "shards"
    return "unknown"


def capfilt_folders_inside(folder: Path, depth: int = 2) -> list[tuple[Path, str]]:
    """The folders under ``folder`` (``depth`` levels down) that the report can read, with their
    kind, outermost first: a bootstrap folder's own stages are not listed apart from it."""
    found: list[tuple[Path, str]] = []
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return found
    for child in children:
        kind = folder_kind(child)
        if kind != "unknown":
            found.append((child, kind))
        elif depth > 1:
            found += capfilt_folders_inside(child, depth - 1)
    return found


def _stage_counts(run_dir: Path, kind: str) -> dict[str, Any]:
    """What a stage folder holds, for the page's overview: images, and for a filter folder the
    texts it kept per origin (from its ``summary.json``), else the captions its shards carry."""
    counts: dict[str, Any] = {}
    if kind == "filter":
        stage = _read_json(run_dir / "summary.json")
        stage = stage if isinstance(stage, dict) else {}
        for key, label in (("images", "images scored"), ("images_kept", "images kept")):
            if isinstance(stage.get(key), int):
                counts[label] = stage[key]
        origins = stage.get("origins") if isinstance(stage.get("origins"), dict) else {}
        for origin, label in (("web", "web texts"), ("synthetic", "synthetic captions")):
            row = origins.get(origin) if isinstance(origins.get(origin), dict) else {}
            if isinstance(row.get("texts"), int):
                counts[label] = row["texts"]
            if isinstance(row.get("kept"), int):
                counts[f"{label} kept"] = row["kept"]
        return counts
    markers = [_read_json(p) for p in sorted(run_dir.glob(f"*{STATS_SUFFIX}"))]
    markers = [  # capfilt's done-markers name their stage (img2dataset's _stats.json do not)
        m
        for m in markers
        if isinstance(m, dict) and isinstance(m.get("count"), int) and "stage" in m
    ]
    if markers:  # one done-marker per finished shard
        counts["shards"] = len(markers)
        counts["images"] = sum(m["count"] for m in markers)
    captions = [m.get("synthetic_captions") for m in markers]
    if kind == "caption" and captions and all(isinstance(n, int) for n in captions):
        counts["synthetic captions"] = sum(captions)
    return counts


def _training_facts(
    run_dir: Path, rows: list[dict[str, Any]], missing: list[str]
) -> dict[str, Any]:
    """A training run's stage, recipe, data, last logged step and loss (for the page's
    overview); notes a run without its ``model/`` as unfinished."""
    facts: dict[str, Any] = {}
    try:
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except Exception:  # absent or damaged: the page shows what the metrics say
        config = None
    if isinstance(config, dict):
        recipe = config.get("recipe") if isinstance(config.get("recipe"), dict) else {}
        for label, value in (
            ("stage", config.get("stage")),
            ("recipe", recipe.get("name")),
            ("initialised from", config.get("init")),
        ):
            if isinstance(value, str):
                facts[label] = value
        shards = config.get("shards")
        if isinstance(shards, list) and all(isinstance(s, str) for s in shards):
            facts["shards"] = ", ".join(shards)
    if rows:
        last = rows[-1]
        facts["last logged step"] = int(last["step"])
        if isinstance(last.get("loss"), int | float):
            facts["loss at that step"] = round(float(last["loss"]), 4)
    if not (run_dir / "model").is_dir():
        step = f" (last logged step {int(rows[-1]['step'])})" if rows else ""
        missing.append(
            f"model/ not found: the run has not finished, or was stopped{step}; "
            "`capfilt pretrain`/`finetune` with the same --out resumes it"
        )
    return facts


def _unfinished_stages(manifest: dict[str, Any], missing: list[str]) -> None:
    """Note the stages a run's ``manifest.json`` records as begun and not done (running,
    stopped by a kill, or partial): the page's figures do not include them yet."""
    stages = manifest.get("stages")
    if not isinstance(stages, dict):
        return
    unfinished = [
        f"{key} ({'running or stopped' if rec.get('status') == 'running' else rec.get('status')})"
        for key, rec in stages.items()
        if isinstance(rec, dict) and rec.get("status") != "done"
    ]
    if unfinished:
        missing.append(f"manifest.json: not finished: {', '.join(unfinished)}")


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    missing: list[str] = []
    kind = folder_kind(run_dir)
    data = RunData(run_dir=run_dir, kind=kind, missing=missing)
    if kind == "unknown":  # list every part a bootstrap folder would have
        missing.append(f"{run_dir} holds no capfilt run, stage output or training run")
    if kind in ("run", "unknown"):
        # the page's tables show the last round: its texts, scores and examples with them
        last = last_round_dir(run_dir)
        data.filtered_dir = last / "data" / "web_filtered"
        data.captioned_dir = last / "data" / "web_captioned"
        manifest = _read_json(run_dir / "manifest.json")
        manifest = manifest if isinstance(manifest, dict) else {}
        _unfinished_stages(manifest, missing)
        inputs = manifest.get("inputs") if isinstance(manifest.get("inputs"), dict) else {}
        data.released = bool(inputs.get("captioner") and inputs.get("filter"))
        expected = RUN_NAMES
        if data.released:
            expected = ("pretrain_capfilt",) if inputs.get("pretrain_after") else ()
        data.summary = load_summary(run_dir, missing)
        fill_from_folder(run_dir, data.summary)
        data.metrics = load_metrics(run_dir, missing, expected)
        for later in round_dirs(run_dir):
            for name, rows in load_metrics(later, []).items():
                data.metrics[f"{name} ({later.name.replace('_', ' ')})"] = rows
        data.texts = load_texts(run_dir, missing, folder=data.filtered_dir)
        return data
    counts = _stage_counts(run_dir, kind)
    if kind == "filter":
        data.filtered_dir = data.captioned_dir = run_dir
        stage_summary = _read_json(run_dir / "summary.json")
        rule = stage_summary.get("rule") if isinstance(stage_summary, dict) else None
        if isinstance(rule, dict):
            data.summary = {"filter": {"threshold": rule.get("threshold"), "rule": rule}}
        data.texts = load_texts(run_dir, missing, folder=run_dir)
        missing.append(
            "examples show the images the filter kept (its shards hold no rejected image)"
        )
    elif kind in ("caption", "shards"):
        data.captioned_dir = run_dir
    elif kind == "training":
        rows = []
        for line in (
            (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines()[:MAX_METRIC_LINES]
            if (run_dir / "metrics.jsonl").is_file()
            else []
        ):
            try:
                row = _clean_row(json.loads(line))
            except ValueError:
                row = None
            if row is not None:
                rows.append(row)
        data.metrics = {run_dir.name: rows}
        counts = _training_facts(run_dir, rows, missing)
    if counts:
        data.summary["data"] = counts
    return data
