"""``capfilt eval ...``: evaluation commands (the work lives in :mod:`capfilt.eval`).

capfilt eval retrieval demo --model runs/pretrain --shards data/test --k 32 --out results.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capfilt.cli.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    DryRunOption,
    RecipeArgument,
    SetOption,
    fail,
    out,
    resolve,
)
from capfilt.utils.threads import use_threads

app = typer.Typer(
    help="Evaluate: retrieval (ITC + ITM re-rank), captioner metrics, filter precision/recall.",
    no_args_is_help=True,
)


def _print_retrieval(result: dict) -> None:
    from rich.table import Table

    rerank = (
        f" ({result['rerank_score']} score)" if result.get("k") and "rerank_score" in result else ""
    )
    table = Table(
        title=f"retrieval: {result['n_images']} images, {result['n_texts']} texts, k = {result['k']}{rerank}",
        caption=f"mean recall {result['r_mean']:.2f}; {result['seconds']:.1f} s",
    )
    table.add_column("")
    for name in ("R@1", "R@5", "R@10", "mean"):
        table.add_column(name, justify="right")
    for prefix, label in (
        ("tr", "text retrieval (image→text)"),
        ("ir", "image retrieval (text→image)"),
    ):
        table.add_row(
            label, *(f"{result[f'{prefix}_{key}']:.2f}" for key in ("r1", "r5", "r10", "mean"))
        )
    itc = result.get("itc")
    if isinstance(itc, dict):  # the same features ranked by ITC alone: what the re-rank adds
        for prefix, label in (
            ("tr", "text retrieval, ITC alone"),
            ("ir", "image retrieval, ITC alone"),
        ):
            table.add_row(
                label,
                *(f"{itc[f'{prefix}_{key}']:.2f}" for key in ("r1", "r5", "r10", "mean")),
            )
    out.print(table)


@app.command("retrieval")
def retrieval(
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            "-m",
            help="A capfilt model folder or run folder (its model/ or latest checkpoint), or a "
            "transformers BLIP folder or hub id (converted as the stage starts).",
        ),
    ],
    shards: Annotated[
        list[str],
        typer.Option(
            "--shards",
            help="Test shards: folder, brace pattern, .tar, URL or pipe: command, or a list file (urls.txt, @file) of those (repeatable).",
        ),
    ],
    k: Annotated[
        int | None,
        typer.Option(
            "--k",
            help="Candidates re-ranked by ITM per query; 0 = ITC only (default: the recipe's eval.k).",
        ),
    ] = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the metrics to this JSON file.")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="torch device (default: cuda when available, else cpu)."),
    ] = None,
    recipe: RecipeArgument = "demo",
    set_: SetOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Image-text retrieval, BLIP scheme: ITC top-k then ITM re-rank; TR/IR R@1/5/10, and the same for ITC alone.

    The re-rank score is the recipe's eval.rerank_score: blip (ITM match logit + cosine),
    log_odds (ITM log-odds + cosine / temperature) or log_prob (ITM log-probability of a match +
    cosine / temperature); e.g. --set eval.rerank_score=log_prob.

    Every caption of a test image is a query and a candidate; an image counts as retrieved when any of its captions is ranked within K.

    Under torchrun the re-rank is split over the ranks.
    """
    from capfilt.config import ConfigError
    from capfilt.data.workers import start_worker_server

    cfg = resolve(recipe, set_, dry_run, shortcuts={"eval.k": k}, reads=("eval", "data"))
    if cfg.eval.k < 0:
        raise fail(f"--k: must be >= 0, got {cfg.eval.k}", EXIT_USAGE)
    start_worker_server(cfg.eval.num_workers)  # its imports run beside the ones below
    from capfilt.data.shards import ShardSpecError, expand_shards
    from capfilt.eval.retrieval import evaluate_retrieval
    from capfilt.utils.dist import current_dist_info

    try:
        urls = expand_shards(shards)  # fail fast on a bad --shards, before loading the model
        with use_threads(cfg.runtime.threads, cfg.eval.num_workers):
            result = evaluate_retrieval(
                model, urls, k=cfg.eval.k, batch_size=cfg.eval.batch_size,
                max_words=cfg.data.max_words, device=device, show_progress=True,
                num_workers=cfg.eval.num_workers, rerank_score=cfg.eval.rerank_score,
            )  # fmt: skip
    except (ShardSpecError, ConfigError) as err:
        raise fail(str(err), EXIT_USAGE) from None
    except ValueError as err:
        raise fail(str(err), EXIT_FAILURE) from None

    if not current_dist_info().is_main:
        return
    _print_retrieval(result)
    if out_path is not None:
        from capfilt.utils.files import atomic_write_json

        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_path, {**result, "model": str(model), "shards": urls})
        out.print(f"wrote {out_path}")


def _write(out_path: Path | None, result: dict) -> None:
    if out_path is None:
        return
    from capfilt.utils.files import atomic_write_json

    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, result)
    out.print(f"wrote {out_path}")


@app.command("caption")
def caption(
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            "-m",
            help="The captioner: a capfilt model folder or run folder, or a transformers BLIP "
            "captioner folder or hub id (converted as the evaluation starts).",
        ),
    ],
    shards: Annotated[
        list[str],
        typer.Option(
            "--shards",
            help="Test shards whose json captions are the references (synthetic ones left out; repeatable).",
        ),
    ],
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the metrics to this JSON file.")
    ] = None,
    meteor: Annotated[bool, typer.Option(help="Also METEOR (needs Java; slower).")] = False,
    recipe: RecipeArgument = "demo",
    set_: SetOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Caption each test image (caption.* settings) and score BLEU-1..4, CIDEr-D and ROUGE-L against its references.

    On the built-in benchmark it also reports the fraction of captions true of their scene (exact check).
    """
    from rich.table import Table

    from capfilt.config import ConfigError
    from capfilt.data.shards import ShardSpecError, expand_shards
    from capfilt.eval.stage_eval import evaluate_captioner
    from capfilt.utils.dist import current_dist_info

    cfg = resolve(recipe, set_, dry_run, reads=("caption",))
    metrics = ("bleu", "cider", "rouge", "meteor") if meteor else ("bleu", "cider", "rouge")
    try:
        with use_threads(cfg.runtime.threads):
            result = evaluate_captioner(model, shards, cfg.caption, metrics=metrics)
    except (ShardSpecError, ConfigError) as err:
        raise fail(str(err), EXIT_USAGE) from None
    except ValueError as err:
        raise fail(str(err), EXIT_FAILURE) from None
    if not current_dist_info().is_main:  # under torchrun: the gathered result, printed once
        return
    table = Table(
        "metric",
        "value",
        title=f"captioner on {result.get('n_images', '?')} images ({result['method']}; "
        "scores ×100, as papers report them)",
    )
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l", "meteor", "truth_rate"):
        value = result.get(key)
        if value is not None:
            table.add_row(key, f"{100 * value:.1f}%" if key == "truth_rate" else f"{value:.2f}")
    out.print(table)
    _write(out_path, {**result, "model": str(model), "shards": expand_shards(shards)})


def _print_truth(result: dict, stored_rule: str) -> None:
    """The truth file's figures: ITM alone, ITC alone, and the decisions the filter stored
    (``stored_rule`` says by which rule)."""
    from rich.table import Table

    from capfilt.pipeline.summary import fmt

    heads = result["heads"]
    stored = result.get("stored_decision") or {}
    table = Table(
        "figure",
        f"ITM > {heads['itm']['threshold']:g}",
        f"ITC cosine > {heads['itc']['threshold']:g}"
        + (f" ({heads['itc']['note']})" if "note" in heads["itc"] else ""),
        f"stored decision ({stored_rule})",
        title=f"against the truth file: {result['n_matched']} labelled texts "
        f"({result['n_noisy']} not clean)",
    )
    for key in ("precision", "recall", "f1", "auc"):
        # a decision has no ROC curve: its AUC cell stays empty
        decided = fmt(stored.get(key)) if key != "auc" else ""
        table.add_row(key, fmt(heads["itm"].get(key)), fmt(heads["itc"].get(key)), decided)
    out.print(table)
    if result.get("n_repeated_rows"):
        out.print(f"note: {result['n_repeated_rows']} repeated truth row(s) counted once")
    if result.get("n_unmatched"):
        out.print(
            f"note: {result['n_unmatched']} of the truth file's {result['n_labels']} labels "
            "matched no scored text (left out)"
        )


def _local_scores(given: str) -> Path:
    """``--scores`` as a local path; an error names it as given (a URL with its slashes)."""
    from capfilt.data.shards import REMOTE_PREFIXES

    if given.startswith(REMOTE_PREFIXES) or "://" in given:
        raise fail(f"--scores must be a local folder or parquet file, not {given}", EXIT_USAGE)
    path = Path(given)
    if not path.exists():
        raise fail(f"--scores not found: {given}", EXIT_USAGE)
    return path


@app.command("filter")
def filter_(
    scores_arg: Annotated[
        str,  # not a Path: Path("http://host/x") would lose a slash of the URL in messages
        typer.Option(
            "--scores",
            help="A local filter output folder (its per-text parquet) or one parquet file.",
        ),
    ],
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Re-decide every text at softmax(itm)[1] > threshold (default: the decisions "
            "the filter stored, and the recipe's filter.threshold for the truth file)."
        ),
    ] = None,
    truth: Annotated[
        Path | None,
        typer.Option(
            "--truth",
            help="Hand labels: csv/parquet of uid,clean (and optionally text_index); reports "
            "ITM and ITC cosine precision/recall/F1/AUC side by side.",
        ),
    ] = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the report to this JSON file.")
    ] = None,
    recipe: RecipeArgument = "demo",
    set_: SetOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Filter quality where the truth is known: precision/recall/F1 of rejecting noisy web texts, ROC AUC, sweep, per noise kind."""
    from rich.table import Table

    from capfilt.eval.stage_eval import evaluate_filter

    cfg = resolve(
        recipe, set_, dry_run, shortcuts={"filter.threshold": threshold}, reads=("filter",)
    )
    from capfilt.utils.dist import env_dist_info

    if not env_dist_info().is_main:  # under torchrun: no model, nothing to split; printed once
        return
    scores = _local_scores(scores_arg)
    from capfilt.config.core import parse_override
    from capfilt.eval.filter_metrics import config_rule, keep_rule, stored_rule

    # a filter output is judged by the rule and thresholds it decided with (a keep-fraction or
    # re-decided run records its own), unless a threshold is asked for
    given = {".".join(parse_override(item)[0]) for item in set_ or []}
    stored = stored_rule(scores) if scores.is_dir() else None
    redecide = threshold is not None or "filter.threshold" in given
    if redecide:
        rule = keep_rule(None, cfg.filter.threshold)  # --threshold: ITM > t, BLIP's rule
    else:
        rule = stored or config_rule(cfg.filter)
    # the truth file's ITM-alone and ITC-alone columns: the rule's thresholds where it has them
    itm_threshold = rule["threshold"] if rule["threshold"] is not None else cfg.filter.threshold
    itc_threshold = (
        cfg.filter.itc_threshold
        if "filter.itc_threshold" in given or rule["itc_threshold"] is None
        else rule["itc_threshold"]
    )
    from capfilt.pipeline.summary import filter_figures, fmt, fmt_pct, rule_text

    labels = by_truth = None
    if truth is not None:
        from capfilt.eval.filter_metrics import load_score_tables, load_truth, truth_report

        try:
            labels = load_truth(truth)
            by_truth = truth_report(load_score_tables(scores), labels, itm_threshold, itc_threshold)
        except (OSError, ValueError) as err:
            raise fail(f"--truth {truth}: {err}", EXIT_USAGE) from None
        # the stored decisions' rule: the filter run's, else (a bare parquet) unknown here
        _print_truth(by_truth, rule_text(stored) if stored else "as stored")
    try:
        # with --truth, every figure below (and the sweep) is judged by its labels
        report = evaluate_filter(scores, itm_threshold, redecide=redecide, rule=rule, truth=labels)
    except (ValueError, KeyError) as err:
        raise fail(f"cannot read filter scores from {scores}: {err}", EXIT_USAGE) from None
    if by_truth is not None:
        report["truth_file"] = by_truth

    whose = "asked for" if redecide else "the recipe's" if stored is None else "the filter run's"
    table = Table("figure", "value", title=f"filter rule {rule_text(rule)} ({whose})")
    for figure in filter_figures(report):
        table.add_row(figure.label, figure.text)
    synthetic = report.get("synthetic")
    if synthetic:
        table.add_row(
            "Synthetic captions true of their scene", fmt_pct(synthetic.get("true_fraction"))
        )
        table.add_row("F1 rejecting false synthetic captions", fmt(synthetic.get("f1")))
    out.print(table)
    for note in report.get("notes") or []:
        out.print(f"note: {note}")
    _write(out_path, report)
