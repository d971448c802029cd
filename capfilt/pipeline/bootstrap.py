"""``capfilt bootstrap``: the CapFilt loop (docs/architecture.md §3) on the user's own shards.

    capfilt bootstrap real-cpu --human data/human --web data/web --test data/test --out boot
    capfilt bootstrap demo --web data/web --captioner blip-cap/ --filter blip-itm/ --out boot

Stages, in order (round 1; ``--rounds N`` repeats the round's stages N times):

1. ``pretrain-baseline``  MED on human + web                      → runs/pretrain_baseline
2. ``finetune-captioner`` LM on human, from the round's init       → runs/captioner
3. ``finetune-filter``    ITC + ITM on human, from the round's init → runs/filter
4. ``caption``            synthetic captions for the web images     → data/web_captioned
5. ``filter``             web + synthetic texts judged              → data/web_filtered
6. ``pretrain-capfilt``   a new MED from scratch on human + kept    → runs/pretrain_capfilt
7. ``evaluate``           retrieval of every pretrained model and the captioner's caption
                          metrics on ``--test``; the filter's figures → eval/, summary.json

Round 1's init is the baseline; round r+1 fine-tunes from round r's re-pretrained model and
bootstraps the *original* web shards again. Round 1 writes into the run folder itself (the
layout ``capfilt demo`` and ``capfilt report`` know); round r ≥ 2 writes the same layout under
``round_r/``. With released models (``captioner``/``filter`` given) the baseline and the
fine-tunes are left out: round 1 captions and filters with them, and re-pretrains only with
``pretrain_after``.

``manifest.json`` names every stage's status, output and inputs, with the recipe hash and the
run's inputs (shard specs and models, by path). A stage that is done is skipped on a re-run; an
interrupted one resumes from its own checkpoints (training) or done-markers (shard stages). A
changed recipe or input is refused (:class:`BootstrapConflict`) unless ``restart_from`` names
the stage to redo: its output and every later stage's are removed and made again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capfilt.config import (
    CAPTION_METHODS,
    ConfigError,
    Recipe,
    changed_keys,
    config_hash,
    dump_yaml,
    recipe_identity,
    to_dict,
)
from capfilt.eval.caption_metrics import CAPTION_METRICS_MISSING, caption_metrics_available
from capfilt.pipeline.epoch_sizes import check_epoch_sizes
from capfilt.utils.files import atomic_write_bytes, atomic_write_json
from capfilt.utils.logging import get_logger
from capfilt.utils.threads import use_threads

log = get_logger("bootstrap")

STAGES = (  # in pipeline order
    "pretrain-baseline",
    "finetune-captioner",
    "finetune-filter",
    "caption",
    "filter",
    "pretrain-capfilt",
    "evaluate",
)
ROUND_STAGES = STAGES[1:6]
"""The stages every round repeats."""
ABLATIONS = ("oracle", "filter-only", "captioner-only")
"""Pretrains that tell what each half of CapFilt is worth (BLIP Table 1's C and F rows), beside
the baseline and CapFilt: human + only the truly clean web texts (the benchmark's truth), human +
the web texts the filter kept, human + every web text and synthetic caption
(:mod:`capfilt.pipeline.ablations` plans them)."""
MANIFEST_FORMAT = 1


class BootstrapConflict(ConfigError):
    """The run folder was made with another recipe or other inputs."""


@dataclass
class BootstrapInputs:
    """What the loop runs on: shard specs (folders, brace patterns, tars) and released models."""

    human: list[str] = field(default_factory=list)
    web: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    captioner: str | None = None
    filter: str | None = None
    pretrain_after: bool = False
    rounds: int = 1

    @property
    def released(self) -> bool:
        return self.captioner is not None or self.filter is not None

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"--rounds: must be >= 1, got {self.rounds}")
        if not self.web:
            raise ConfigError("--web: give the web shards to bootstrap")
        if self.released and (self.captioner is None or self.filter is None):
            raise ConfigError("--captioner and --filter go together (released models)")
        if self.released and self.rounds > 1 and not self.pretrain_after:
            raise ConfigError(
                "--rounds > 1 with released models needs --pretrain-after (round 2 fine-tunes "
                "from round 1's re-pretrained model)"
            )
        trains = not self.released or self.pretrain_after
        if trains and not self.human:
            raise ConfigError("--human: the human-annotated shards are needed to train")

    def check_present(self) -> None:
        """Every shard spec names shards, so that a mistyped path stops the run before its first
        stage instead of at the stage that reads it, hours later, with the manifest already
        naming it."""
        from capfilt.data.shards import ShardSpecError, expand_shards

        for option, specs in (("--human", self.human), ("--web", self.web), ("--test", self.test)):
            try:
                if specs:
                    expand_shards(specs)
            except ShardSpecError as err:
                raise ShardSpecError(f"{option}: {err}") from None

    def check_models(self, filter_heads: tuple[str, ...]) -> list[str]:
        """Each released model resolved (a hub id fetched) and judged as its stage will judge
        it, from its meta or config, before the first stage: a missing one or one without the
        heads its stage reads (a captioner as ``--filter``) is a ConfigError now, not after the
        captioning. Returns warnings: a model fine-tuned for the other half
        (:func:`~capfilt.runs.resolve.made_for`)."""
        from capfilt.runs.resolve import check_heads_trained, made_for, peek_stage_model

        warnings = []
        for option, spec, heads, use in (
            ("--captioner", self.captioner, ("lm",), "captioning"),
            ("--filter", self.filter, filter_heads, "filtering"),
        ):
            if spec is None:
                continue
            try:
                meta, folder = peek_stage_model(spec)
                check_heads_trained(meta, folder, heads, use)
            except ConfigError as err:
                raise ConfigError(f"{option}: {err}") from None
            unfit = made_for(meta, use)
            if unfit is not None:
                warnings.append(f"{option} {spec} was {unfit}")
        return warnings

    def fingerprint(self, root: Path | None = None) -> dict[str, Any]:
        """The inputs as the manifest compares them: paths made absolute, rounds left out (a
        run may be extended by more rounds). A path inside ``root`` (the run folder: the demo's
        own shards) is written relative to it, so a run folder moved or copied elsewhere still
        resumes."""

        def spec(text: str) -> str:
            # a URL or pipe spec stays as written; a path is made absolute whether or not it
            # exists yet (the demo names its shard folders before it writes them)
            if is_url(text):
                return text
            return run_relative(os.path.abspath(text), root)

        return {
            "human": [spec(s) for s in self.human],
            "web": [spec(s) for s in self.web],
            "test": [spec(s) for s in self.test],
            "captioner": spec(self.captioner) if self.captioner else None,
            "filter": spec(self.filter) if self.filter else None,
            "pretrain_after": self.pretrain_after,
        }


RUN_FOLDER = "<run>"
"""How the manifest writes the run folder at the start of a path inside it."""


def run_relative(path: str, root: Path | None) -> str:
    """``path`` (absolute) as ``<run>/...`` when it lies inside the run folder ``root``."""
    if root is None:
        return path
    base = os.path.abspath(root)
    if path == base or path.startswith(base + os.sep):
        return RUN_FOLDER + path[len(base) :]
    return path


def is_url(spec: str) -> bool:
    """A URL or pipe spec (``s3://``, ``pipe:``), not a path."""
    return re.match(r"^[a-z][a-z0-9+.-]+:", spec) is not None


def recorded_path(text: str | Path, root: Path) -> str:
    """A stage's input or output as the manifest and summary name it: relative to the run folder
    ``root`` when inside it (a moved run folder's records stay true), else absolute; a URL,
    pipe spec or hub id as written."""
    from capfilt.runs.resolve import is_hub_id

    text = str(text)
    if is_url(text) or is_hub_id(text):
        return text
    path, base = os.path.abspath(text), os.path.abspath(root)
    if path == base or path.startswith(base + os.sep):
        return os.path.relpath(path, base)
    return path


@dataclass
class BootstrapLayout:
    """Where each output of a run folder lives."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def round_dir(self, round_: int) -> Path:
        return self.root if round_ == 1 else self.root / f"round_{round_}"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        return self.data / name

    def run(self, name: str, round_: int = 1) -> Path:
        return self.round_dir(round_) / "runs" / name

    @property
    def baseline(self) -> Path:
        return self.run("pretrain_baseline")

    def captioner(self, round_: int) -> Path:
        return self.run("captioner", round_)

    def filter(self, round_: int) -> Path:
        return self.run("filter", round_)

    def capfilt(self, round_: int) -> Path:
        return self.run("pretrain_capfilt", round_)

    def ablation(self, name: str) -> Path:
        """The run folder of ablation ``name`` (one of :data:`ABLATIONS`)."""
        return self.run(f"pretrain_{name.replace('-', '_')}")

    def ablation_data(self, name: str) -> Path:
        """The web shards ablation ``name`` pretrains on, where it derives its own."""
        return self.data / f"web_{name.replace('-', '_')}"

    def captioned(self, round_: int) -> Path:
        return self.round_dir(round_) / "data" / "web_captioned"

    def filtered(self, round_: int) -> Path:
        return self.round_dir(round_) / "data" / "web_filtered"

    def eval(self, round_: int = 1) -> Path:
        return self.round_dir(round_) / "eval"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


@dataclass
class Step:
    """One stage of one round: ``run`` makes ``output`` from ``inputs``; ``needs`` are the keys
    of the steps whose outputs it reads."""

    key: str
    stage: str
    round: int
    output: Path
    inputs: list[str]
    run: Callable[[], Any]
    needs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StageEvent:
    """What :func:`run_bootstrap` tells its caller about a step: ``status`` is ``start``,
    ``done``, ``done-earlier``, ``skipped`` or ``partial``."""

    key: str
    status: str
    output: Path
    seconds: float | None = None


def step_key(stage: str, round_: int) -> str:
    return stage if round_ == 1 else f"round_{round_}/{stage}"


def marker_path(layout: BootstrapLayout, key: str) -> Path:
    return layout.stages / f"{key.replace('/', '-')}.json"


def train_stage(
    stage: str, recipe: Recipe, shards: list[str], out: Path, init: Path | str | None = None
) -> Path:
    from capfilt.train.trainer import TrainJob, train

    return train(
        TrainJob(
            stage=stage,
            recipe=recipe,
            shards=[str(s) for s in shards],
            out=out,
            init=Path(init) if init is not None else None,
            resume="auto",
        )
    )


def repretrain_sources(human: list[str], filtered: Path) -> list[str]:
    """Human shards + the filter's kept shards (or another derived web set); human alone when
    it holds nothing (a source without samples cannot feed the training stream)."""
    from capfilt.data.shards import count_samples, expand_shards
    from capfilt.utils.dist import env_dist_info

    if not any(Path(filtered).glob("*.tar")) or count_samples(expand_shards([str(filtered)])) == 0:
        if env_dist_info().is_main:  # every rank decides alike (under torchrun)
            log.warning("no web sample left in %s: pretraining on the human shards only", filtered)
        return list(human)
    return [*human, str(filtered)]


def _shard_stage(result) -> dict[str, Any]:
    return {"stats": result.stats, "partial": result.partial, "failed": list(result.failed)}


def plan_steps(recipe: Recipe, inputs: BootstrapInputs, layout: BootstrapLayout) -> list[Step]:
    """Every step of the run, in order (the evaluate step is added by :func:`run_bootstrap`)."""
    steps: list[Step] = []
    human, web = list(inputs.human), list(inputs.web)
    if not inputs.released:
        steps.append(
            Step(
                "pretrain-baseline", "pretrain-baseline", 1, layout.baseline, human + web,
                lambda: train_stage("pretrain", recipe, human + web, layout.baseline),
            )
        )  # fmt: skip
    for r in range(1, inputs.rounds + 1):
        if r == 1 and inputs.released:
            captioner, filt = str(inputs.captioner), str(inputs.filter)
            model_needs: list[str] = []
        else:
            init = layout.baseline if r == 1 else layout.capfilt(r - 1)
            init_key = "pretrain-baseline" if r == 1 else step_key("pretrain-capfilt", r - 1)
            cap_dir, filt_dir = layout.captioner(r), layout.filter(r)
            steps.append(
                Step(
                    step_key("finetune-captioner", r), "finetune-captioner", r, cap_dir, human,
                    lambda init=init, out=cap_dir: train_stage("captioner", recipe, human, out, init),
                    [init_key],
                )
            )  # fmt: skip
            steps.append(
                Step(
                    step_key("finetune-filter", r), "finetune-filter", r, filt_dir, human,
                    lambda init=init, out=filt_dir: train_stage("filter", recipe, human, out, init),
                    [init_key],
                )
            )  # fmt: skip
            captioner, filt = str(cap_dir), str(filt_dir)
            model_needs = [step_key("finetune-captioner", r), step_key("finetune-filter", r)]
        captioned, filtered = layout.captioned(r), layout.filtered(r)

        def do_caption(model=captioner, out=captioned) -> dict:
            from capfilt.pipeline.caption import caption_shards

            with use_threads(recipe.runtime.threads, recipe.caption.num_workers):
                return _shard_stage(caption_shards(model, web, out, recipe.caption))

        def do_filter(model=filt, src=captioned, out=filtered) -> dict:
            from capfilt.pipeline.filter import filter_shards

            with use_threads(recipe.runtime.threads, recipe.filter.num_workers):
                return _shard_stage(
                    filter_shards(model, [str(src)], out, recipe.filter, recipe.data.max_words)
                )

        steps.append(
            Step(step_key("caption", r), "caption", r, captioned, [captioner, *web], do_caption,
                 model_needs[:1])
        )  # fmt: skip
        steps.append(
            Step(step_key("filter", r), "filter", r, filtered, [filt, str(captioned)], do_filter,
                 [*model_needs[1:], step_key("caption", r)])
        )  # fmt: skip
        if not inputs.released or inputs.pretrain_after:
            out = layout.capfilt(r)
            steps.append(
                Step(
                    step_key("pretrain-capfilt", r), "pretrain-capfilt", r, out,
                    [*human, str(filtered)],
                    lambda out=out, filtered=filtered: train_stage(
                        "pretrain", recipe, repretrain_sources(human, filtered), out
                    ),
                    [step_key("filter", r)],
                )
            )  # fmt: skip
    return steps


# -- evaluation ----------------------------------------------------------------------------------


def filter_metrics(filtered: Path, rule: dict[str, Any] | float) -> dict[str, Any]:
    """The filter's figures from its per-text parquet (precision/recall/F1 where truth is there),
    judged by ``rule`` (``filter_metrics.keep_rule``, or a bare ITM threshold)."""
    from capfilt.eval.filter_metrics import filter_report, keep_rule, load_score_tables

    table = load_score_tables(filtered).rename(columns={"itm_score": "score"})
    rule = keep_rule(None, float(rule)) if isinstance(rule, int | float) else keep_rule(rule)
    return filter_report(table, rule=rule)


def _stage_rule(filtered: Path, recipe: Recipe) -> dict[str, Any]:
    """The rule the filter stage decided with (a keep-fraction run records its thresholds)."""
    from capfilt.eval.filter_metrics import config_rule, stored_rule

    return stored_rule(filtered) or config_rule(recipe.filter)


def _retrieval(model_dir: Path, test: list[str], recipe: Recipe) -> dict[str, Any]:
    from capfilt.eval.retrieval import evaluate_retrieval

    with use_threads(recipe.runtime.threads, recipe.eval.num_workers):
        return evaluate_retrieval(
            model_dir,
            test,
            k=recipe.eval.k,
            batch_size=recipe.eval.batch_size,
            max_words=recipe.data.max_words,
            num_workers=recipe.eval.num_workers,
            rerank_score=recipe.eval.rerank_score,
        )


def _done_model(run_dir: Path) -> Path | None:
    return run_dir / "model" if (run_dir / "model" / "capfilt.json").is_file() else None


RoundExtra = Callable[[int, BootstrapLayout], dict[str, Any]]


def evaluate_run(
    recipe: Recipe,
    inputs: BootstrapInputs,
    layout: BootstrapLayout,
    round_extra: RoundExtra | None = None,
) -> dict[str, Any]:
    """Evaluate every output present: retrieval of each pretrained model (ablations included)
    and the caption metrics of each captioner on ``inputs.test``, the filter's figures of each round (from its parquet),
    and ``round_extra`` (the demo's truth checks). Each part also goes to its round's eval/."""
    from capfilt.eval.stage_eval import evaluate_captioner

    test = list(inputs.test)
    results: dict[str, Any] = {"baseline": {}, "rounds": []}
    layout.eval(1).mkdir(parents=True, exist_ok=True)
    baseline = _done_model(layout.baseline)
    if test and baseline is not None:
        results["baseline"] = {"retrieval": _retrieval(baseline, test, recipe)}
        atomic_write_json(
            layout.eval(1) / "baseline_retrieval.json", results["baseline"]["retrieval"]
        )
    ablations = {}
    for name in ABLATIONS:  # every ablation run present, whether or not this run made it
        model = _done_model(layout.ablation(name))
        if test and model is not None:
            ablations[name] = {"retrieval": _retrieval(model, test, recipe)}
            atomic_write_json(
                layout.eval(1) / f"{name.replace('-', '_')}_retrieval.json",
                ablations[name]["retrieval"],
            )
    if ablations:
        results["ablations"] = ablations
    for r in range(1, inputs.rounds + 1):
        ev = layout.eval(r)
        ev.mkdir(parents=True, exist_ok=True)
        row: dict[str, Any] = {"round": r}
        capfilt_model = _done_model(layout.capfilt(r))
        if test and capfilt_model is not None:
            row["capfilt"] = {"retrieval": _retrieval(capfilt_model, test, recipe)}
            atomic_write_json(ev / "capfilt_retrieval.json", row["capfilt"]["retrieval"])
        captioner = (
            inputs.captioner if (r == 1 and inputs.released) else _done_model(layout.captioner(r))
        )
        if test and captioner is not None:
            with use_threads(recipe.runtime.threads):
                # the recipe's decoder writes the data; the others are reported beside it
                row["captioner"] = evaluate_captioner(
                    captioner, test, recipe.caption, also=CAPTION_METHODS, metrics_required=False
                )
            atomic_write_json(ev / "captioner.json", row["captioner"])
        filtered = layout.filtered(r)
        if any(filtered.glob("*.parquet")):
            row["filter"] = filter_metrics(filtered, _stage_rule(filtered, recipe))
            atomic_write_json(ev / "filter.json", row["filter"])
        if round_extra is not None:
            for key, value in round_extra(r, layout).items():
                row[key] = value
                atomic_write_json(ev / f"{key}.json", value)
        results["rounds"].append(row)
    return results


# -- the manifest --------------------------------------------------------------------------------


def _read_manifest(layout: BootstrapLayout) -> dict[str, Any] | None:
    if not layout.manifest.is_file():
        return None
    try:
        data = json.loads(layout.manifest.read_text())
    except ValueError as err:
        raise ConfigError(f"{layout.manifest} is unreadable ({err}); use a new --out") from None
    return data if isinstance(data, dict) else None


def _write_manifest(layout: BootstrapLayout, manifest: dict[str, Any]) -> None:
    atomic_write_json(layout.manifest, manifest)


RECIPE_KEY_STAGES = (
    ("name", None),
    ("synth.", "synth"),
    ("caption.prompt", "finetune-captioner"),
    ("finetune.captioner.", "finetune-captioner"),
    ("finetune.filter.", "finetune-filter"),
    ("caption.", "caption"),
    ("filter.", "filter"),
    ("eval.", "evaluate"),
)
"""The first stage that reads a recipe key (by prefix, first match); any other key (model, data,
train, seed) is read from the baseline pretrain on. ``name`` labels the run and changes nothing;
``synth.*`` is read by the demo's synth stage only; the captioner's fine-tune trains with
``caption.prompt``."""


def _stage_of_key(key: str, order: tuple[str, ...]) -> str | None:
    """The first stage of ``order`` that reads recipe key ``key`` (None: no stage reads it)."""
    for prefix, stage in RECIPE_KEY_STAGES:
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return stage if stage in order else None
    return "pretrain-baseline"


def inputs_beside(fingerprint: dict[str, Any], root: Path) -> dict[str, Any]:
    """The inputs' paths relative to the run folder (``../my-data/web``): what stays the same
    when a project folder holding the run folder and its data is moved or copied whole."""

    def beside(value):
        if isinstance(value, list):
            return [beside(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value):
            return os.path.relpath(value, os.path.abspath(root))
        return value

    return {key: beside(value) for key, value in fingerprint.items()}


def _changed_inputs(previous: dict[str, Any], fingerprint: dict, root: Path) -> list[str]:
    """The inputs (``human``, ``web``, ...) that differ from the manifest's, both by path and
    by their place relative to the run folder."""

    def relative(value):  # manifests written before paths inside the run were relative
        if isinstance(value, list):
            return [relative(v) for v in value]
        return (
            run_relative(value, root) if isinstance(value, str) and os.path.isabs(value) else value
        )

    before = {k: relative(v) for k, v in (previous.get("inputs") or {}).items()}
    before_beside = previous.get("inputs_beside") or {}
    now_beside = inputs_beside(fingerprint, root)
    absent = object()
    return [
        key
        for key in fingerprint
        if before.get(key) != fingerprint[key] and before_beside.get(key, absent) != now_beside[key]
    ]


INPUT_READERS = {
    "human": ("pretrain-baseline", "finetune-captioner", "finetune-filter", "pretrain-capfilt"),
    "web": ("pretrain-baseline", "caption"),
    "captioner": ("caption",),
    "filter": ("filter",),
    "pretrain_after": ("pretrain-capfilt",),
    "test": ("evaluate",),
}
"""The first stages that read each input (its fingerprint's key; a later reader, such as the
demo's ablations, is redone with them). A run with released models has no
baseline or fine-tune: there ``human`` is read by the re-pretrain alone, so a changed filter or
an added ``--pretrain-after`` redoes the filter or the re-pretrain, never the captions."""


def _first_affected(
    previous: dict[str, Any],
    recipe_hash: str,
    changed: list[str],
    recipe_keys: list[str] | None,
    order: tuple[str, ...] = STAGES,
    planned: tuple[str, ...] | None = None,
) -> str | None:
    """The earliest stage of ``order`` that a change of recipe or of the ``changed`` inputs
    invalidates (None: nothing changed); ``recipe_keys`` are the recipe keys that changed, None
    when they cannot be told (then the first stage). ``planned``: the stages this run has; a
    recipe change counts from the first of them at or after the stage that first reads the key,
    an input change from the first planned stage that reads it (none: nothing this run makes)."""
    affected: set[str | None] = set()
    if previous.get("recipe_hash") != recipe_hash:
        if recipe_keys:
            affected |= {_stage_of_key(key, order) for key in recipe_keys}
        else:
            affected.add(order[0])
    if planned:  # the first stage this run has from each one on
        affected = {
            next((s for s in planned if order.index(s) >= order.index(stage)), stage)
            for stage in affected
            if stage is not None
        }
    for key in changed:
        readers = INPUT_READERS.get(key, order[:1])
        affected |= {s for s in readers if s in order and (not planned or s in planned)}
    return next((stage for stage in order if stage in affected), None)


def open_manifest(
    layout: BootstrapLayout,
    recipe: Recipe,
    inputs: BootstrapInputs,
    restart_from: str | None = None,
    order: tuple[str, ...] = STAGES,
    planned: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Create the manifest, or re-open it: a changed recipe or input is refused unless
    ``restart_from`` names the earliest stage it affects or one before it (the caller then
    redoes that stage and every later one). ``order``: every stage name in pipeline order;
    ``planned``: the stages this run has (with released models, no pretrain or fine-tune)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    recipe_hash, fingerprint = config_hash(recipe_identity(recipe)), inputs.fingerprint(layout.root)
    previous = _read_manifest(layout)
    if previous is not None:
        changes = _recipe_changes(layout, recipe)
        keys = None if changes is None else [key for key, _, _ in changes]
        inputs_changed = _changed_inputs(previous, fingerprint, layout.root)
        stage = _first_affected(previous, recipe_hash, inputs_changed, keys, order, planned)
        if stage is not None and not _finished_from(previous, stage, order):
            # nothing made with the old settings is kept (the stage that failed on them, e.g.
            # an unknown epoch size, left no finished output): the corrected command just runs
            stage = None
        if previous.get("recipe_hash") != recipe_hash:
            shown = _describe_changes(changes or [])
            what = f"another recipe ({shown})" if shown else "another recipe"
            same = f"the recipe it was made with ({layout.root / 'recipe.yaml'}) and inputs"
        else:
            old_inputs = previous.get("inputs") or {}
            shown = "; ".join(
                f"--{key.replace('_', '-')}: {_shown(old_inputs.get(key))} -> "
                f"{_shown(fingerprint[key])}"
                for key in inputs_changed
            )
            what = f"other inputs ({shown})" if shown else "other inputs"
            same = "the same recipe and inputs"
        if stage is not None and restart_from is None:
            raise BootstrapConflict(
                f"{layout.root} holds a run made with {what}; re-run with {same} to resume, "
                f"pass --restart-from {stage} to redo the affected stages, or use a new --out"
            )
        if stage is not None and order.index(restart_from) > order.index(stage):
            raise BootstrapConflict(
                f"--restart-from {restart_from} would keep stages of {layout.root} made with "
                f"{what}: the change affects {stage} and every stage after it; pass "
                f"--restart-from {stage} (or an earlier stage), or use a new --out"
            )
    manifest = previous or {"format": MANIFEST_FORMAT, "stages": {}}
    manifest.update(
        {
            "recipe": recipe.name,
            "recipe_hash": recipe_hash,
            "inputs": fingerprint,
            "inputs_beside": inputs_beside(fingerprint, layout.root),
        }
    )
    manifest.setdefault("stages", {})
    atomic_write_bytes(layout.root / "recipe.yaml", dump_yaml(recipe).encode())
    atomic_write_json(layout.root / "recipe.json", {"hash": recipe_hash, "recipe": to_dict(recipe)})
    _write_manifest(layout, manifest)
    return manifest


def _shown(value: Any) -> str:
    """An input as the refusal names it: a list of specs joined, none as "none"."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return "none" if value is None else str(value)


def _finished_from(previous: dict[str, Any], stage: str, order: tuple[str, ...]) -> bool:
    """Whether the manifest records a stage from ``stage`` on (in ``order``) as finished (done
    or partial): output a change from ``stage`` on would leave made with the old settings. The
    evaluation counts only for a change to it: any stage that runs before it has it redone."""
    records = previous.get("stages") if isinstance(previous.get("stages"), dict) else {}
    return any(
        isinstance(record, dict)
        and record.get("status") in ("done", "partial")
        and record.get("stage") in order
        and order.index(record["stage"]) >= order.index(stage)
        and (record["stage"] != "evaluate" or stage == "evaluate")
        for record in records.values()
    )


def _recipe_changes(layout: BootstrapLayout, recipe: Recipe) -> list[tuple[str, Any, Any]] | None:
    """What differs from the recipe the run folder was made with (its ``recipe.json``), as
    (key, old, new); None when that cannot be read."""
    try:
        made_with = json.loads((layout.root / "recipe.json").read_text())["recipe"]
        return changed_keys(recipe_identity(made_with), recipe_identity(recipe))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _describe_changes(changes: list[tuple[str, Any, Any]], most: int = 4) -> str:
    """``train.epochs: 4 -> 10, ...``: the first ``most`` changes."""
    shown = ", ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in changes[:most])
    more = f" and {len(changes) - most} more" if len(changes) > most else ""
    return f"{shown}{more}"


def _reset(layout: BootstrapLayout, manifest: dict[str, Any], step: Step) -> None:
    """Forget ``step``: its output folder (inside the run folder only), marker and record."""
    output = step.output.resolve()
    if output.is_dir() and layout.root.resolve() in output.parents:
        shutil.rmtree(output)
    marker_path(layout, step.key).unlink(missing_ok=True)
    manifest["stages"].pop(step.key, None)


# -- the loop ------------------------------------------------------------------------------------


def _check_selection(names: tuple[str, ...], option: str, known: tuple[str, ...]) -> None:
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(
            f"{option}: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(known)}"
        )


def _check_needs(
    steps: list[Step],
    previous: dict[str, Any] | None,
    skip: tuple[str, ...],
    only: tuple[str, ...],
    restart_from: str | None,
) -> None:
    """Refuse, before anything runs or is removed, a selection under which a step that runs
    needs one that neither is done nor runs: ``--skip``/``--only``/``--restart-from`` name a stage
    of every round, so with ``--rounds 2``, ``--only filter`` also runs ``round_2/filter``, whose
    fine-tuned filter a restart would have removed."""
    records = (previous or {}).get("stages") or {}
    first = next((i for i, s in enumerate(steps) if s.stage == restart_from), len(steps))
    redone = {step.key for step in steps[first:]}
    ready: set[str] = set()
    stage_of = {step.key: step.stage for step in steps}
    for step in steps:
        if step.key not in redone and (records.get(step.key) or {}).get("status") == "done":
            ready.add(step.key)
            continue
        if step.stage in skip or (only and step.stage not in only):
            continue
        for need in step.needs:
            if need not in ready:
                rounds = " (they name that stage in every round)" if step.round > 1 else ""
                raise ConfigError(
                    f"stage {step.key} would run but needs {need}, which is not done and "
                    f"would not run: add {stage_of.get(need, need)} to --only, or drop it "
                    f"from --skip{rounds}; nothing was run"
                )
        ready.add(step.key)


def run_bootstrap(
    recipe: Recipe,
    inputs: BootstrapInputs,
    out: str | Path,
    *,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
    restart_from: str | None = None,
    on_stage: Callable[[StageEvent], None] | None = None,
    pre_steps: list[Step] | None = None,
    post_steps: list[Step] | None = None,
    round_extra: RoundExtra | None = None,
    summary_extra: dict[str, Any] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every step; returns the summary written to ``OUT/summary.json``.

    ``on_warning`` is told what the checks before the first stage find doubtful (logged when
    None), so that a command can show it apart from the stages' log lines.

    ``pre_steps`` run first under the same manifest (the demo's synth), ``post_steps`` after
    the loop and before the evaluation (the ablations, :mod:`capfilt.pipeline.ablations`);
    ``round_extra`` adds per-round evaluations; ``summary_extra`` adds top-level summary keys.
    """
    layout = BootstrapLayout(Path(out))
    pre_steps, post_steps = list(pre_steps or []), list(post_steps or [])
    known = (
        tuple(s.stage for s in pre_steps) + STAGES[:-1] + tuple(s.stage for s in post_steps)
        + STAGES[-1:]
    )  # fmt: skip
    _check_selection(skip, "--skip", known)
    _check_selection(only, "--only", known)
    if restart_from is not None:
        _check_selection((restart_from,), "--restart-from", known)
    inputs.validate()
    if not pre_steps:  # a pre-step (the demo's synth) makes the inputs it names
        inputs.check_present()
    filter_heads = ("itm", "itc") if recipe.filter.computes_cosine else ("itm",)
    for warning in inputs.check_models(filter_heads):
        (on_warning or log.warning)(warning)
    evaluate = Step(
        "evaluate", "evaluate", 1, layout.eval(1), list(inputs.test),
        lambda: evaluate_run(recipe, inputs, layout, round_extra),
    )  # fmt: skip
    steps = [*pre_steps, *plan_steps(recipe, inputs, layout), *post_steps, evaluate]
    # every epoch size a remote source leaves unknown, asked for at once, not one run per stage
    check_epoch_sizes(
        recipe, [s for s in steps if s.stage not in skip and (not only or s.stage in only)]
    )
    planned = tuple(dict.fromkeys(step.stage for step in steps))
    _check_needs(steps, _read_manifest(layout), skip, only, restart_from)
    manifest = open_manifest(layout, recipe, inputs, restart_from, known, planned)
    layout.stages.mkdir(exist_ok=True)
    if inputs.test and not caption_metrics_available():  # said now, not after the training
        log.warning("the closing evaluation: %s", CAPTION_METRICS_MISSING)
    if restart_from is not None:
        first = next((i for i, s in enumerate(steps) if s.stage == restart_from), None)
        if first is None:
            raise ConfigError(f"--restart-from {restart_from}: this run has no such stage")
        for step in steps[first:]:
            _reset(layout, manifest, step)
        # the figures of the stages being redone: a report must not show them as the run's
        layout.summary.unlink(missing_ok=True)
        _write_manifest(layout, manifest)

    def emit(event: StageEvent) -> None:
        if on_stage is not None:
            on_stage(event)

    ran_any, partial = False, None
    timings: dict[str, float] = {}
    for step in steps:
        record = manifest["stages"].get(step.key) or {}
        selected = step.stage not in skip and (not only or step.stage in only)
        done = record.get("status") == "done"
        if step is evaluate and done:
            # evaluate again when anything before it changed or more rounds were added
            done = not ran_any and record.get("rounds") == inputs.rounds
        if done:
            timings[step.key] = float(record.get("seconds") or 0.0)
            emit(StageEvent(step.key, "done-earlier", step.output, timings[step.key]))
            continue
        if not selected:
            emit(StageEvent(step.key, "skipped", step.output))
            continue
        for need in step.needs:
            if (manifest["stages"].get(need) or {}).get("status") != "done":
                raise ConfigError(
                    f"stage {step.key} needs {need}, which is not done (run it first, or drop --skip/--only)"
                )
        manifest["stages"][step.key] = {
            "stage": step.stage,
            "round": step.round,
            "status": "running",
            "output": recorded_path(step.output, layout.root),
            "inputs": [recorded_path(i, layout.root) for i in step.inputs],
            "started": time.time(),
        }
        _write_manifest(layout, manifest)
        emit(StageEvent(step.key, "start", step.output))
        log.info("bootstrap: %s ...", step.key)
        start = time.monotonic()
        value = step.run()
        seconds = round(time.monotonic() - start, 1)
        ran_any = True
        record = manifest["stages"][step.key]
        record["seconds"] = seconds
        if isinstance(value, dict) and value.get("partial"):
            record["status"] = "partial"
            record["failed_shards"] = value.get("failed")
            _write_manifest(layout, manifest)
            emit(StageEvent(step.key, "partial", step.output, seconds))
            partial = step.key
            break
        record["status"] = "done"
        if step is evaluate:
            record["rounds"] = inputs.rounds
            atomic_write_json(layout.eval(1) / "evaluation.json", value)
        _write_manifest(layout, manifest)
        atomic_write_json(marker_path(layout, step.key), {"stage": step.key, "seconds": seconds})
        timings[step.key] = seconds
        emit(StageEvent(step.key, "done", step.output, seconds))

    summary = build_summary(recipe, layout, timings, summary_extra)
    if partial is not None:
        summary["partial"] = partial
    atomic_write_json(layout.summary, summary)
    return summary


def build_summary(
    recipe: Recipe,
    layout: BootstrapLayout,
    timings: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``summary.json``: the last round's figures at the top (baseline, capfilt, filter,
    captioner, and the demo's captions), the ablations' retrieval and the gap CapFilt closes
    (where an oracle ran), every round under ``rounds``, timings and outputs."""
    from capfilt.pipeline.summary import gap_closed

    evaluation = {}
    path = layout.eval(1) / "evaluation.json"
    if path.is_file():
        evaluation = json.loads(path.read_text())
    rounds = evaluation.get("rounds") or []
    last = rounds[-1] if rounds else {}
    manifest = _read_manifest(layout) or {}
    summary: dict[str, Any] = {
        "recipe": recipe.name,
        "seed": recipe.seed,
        **(extra or {}),
        "baseline": evaluation.get("baseline") or {},
        "capfilt": last.get("capfilt") or {},
        "filter": last.get("filter") or {},
        "captioner": last.get("captioner") or {},
        "rounds": rounds,
        "timings": timings,
        "total_seconds": round(sum(timings.values()), 1),
        "outputs": {key: rec.get("output") for key, rec in (manifest.get("stages") or {}).items()},
    }
    if "captions" in last:
        summary["captions"] = last["captions"]
    if evaluation.get("ablations"):
        summary["ablations"] = evaluation["ablations"]
        summary["gap_closed"] = gap_closed(summary)
    return summary
