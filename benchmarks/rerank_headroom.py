"""What the ITM re-rank of retrieval gains, and what it could: re-rank scores against a judge that knows the truth.

    python benchmarks/rerank_headroom.py demo-out                   # every pretrain of a demo folder
    python benchmarks/rerank_headroom.py abl/main/seed0 --runs capfilt,baseline
    python benchmarks/rerank_headroom.py demo-out --model runs/my_pretrain --k 64 --json h.json

For each pretrained model of a demo folder (``runs/pretrain_*``, or ``--model`` folders) on the
folder's test split (``data/test``, built-in benchmark only: its scenes are stored with the
images), with the folder's evaluation settings (``recipe.yaml``: ``eval.k``, ``data.max_words``),
ITC's top ``k`` candidates of every query (images → texts and texts → images) are scored
once by ITM, then ranked in several ways, and mean R@1 (mean of text and image R@1, as the demo's
tables) is printed for each:

- ``itc``: the cosine alone (no re-rank);
- ``blip``, ``log_odds``, ``log_prob``: the ``eval.rerank_score`` choices (docs/architecture.md §4);
- ``itm``: ITM alone (log-odds; the cosine only breaks exact ties);
- ``truth``: a judge that knows the world — candidates true of the image first
  (:func:`capfilt.data.synth.truth.caption_is_true`), each group in ITC order. No ITM head can
  do better at this k without knowing which of several true captions was written for the image.

It also prints how often ITC's first text for an image is false of it, and how often it is true
but another image's caption (which no judge of truth can rank apart from the right one). The
scores agree with ``capfilt eval retrieval`` (same features, same candidates, same ITM, on the
same device).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch

from capfilt.config import RERANK_SCORES, load_recipe
from capfilt.data.reader import read_samples
from capfilt.data.shards import expand_shards
from capfilt.data.synth.truth import caption_is_true
from capfilt.eval.retrieval import compute_features, itm_pair_logits, itm_score
from capfilt.runs.resolve import load_stage_model
from capfilt.utils.device import default_device

SCHEMES = ("itc", "blip", "log_odds", "log_prob", "itm", "truth")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a demo folder (capfilt demo --out, or one ablation run)")
    p.add_argument(
        "--runs",
        default=None,
        help="pretrains to score, comma-separated (default: every runs/pretrain_* of the folder)",
    )
    p.add_argument("--model", action="append", default=[], help="more model folders to score")
    p.add_argument(
        "--k", type=int, default=None, help="candidates re-ranked per query (default: eval.k)"
    )
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p.parse_args()


def _first_of(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The candidate with the highest score per query (the first on ties: ITC order)."""
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, 0]
    return candidates.gather(1, best.unsqueeze(1)).squeeze(1)


def _is_right(direction: str, txt2img: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """Whether each query's pick is its own: an image's caption ("tr"), a text's image ("ir")."""
    if direction == "tr":
        return txt2img[picked] == torch.arange(picked.numel())
    return picked == txt2img


def score_model(
    model_dir: str, test: Path, scenes: dict[str, dict], k: int, max_words: int | None
) -> dict[str, float]:
    # the device and precision `capfilt eval retrieval` uses (a GPU's bf16 can pick another
    # first candidate than the CPU's fp32); features and ITM logits come back to the CPU
    device = default_device()
    model, tokenizer, _, meta, _ = load_stage_model(model_dir, device)
    feats = compute_features(model, tokenizer, str(test), 128, max_words, device, meta=meta)
    scene_of = [scenes[key] for key in feats.image_keys]
    cos = feats.image_feat @ feats.text_feat.t()  # [images, texts]
    temp = float(model.temp.detach())
    memo: dict[tuple[int, int], bool] = {}

    def true(image: int, text: int) -> bool:
        if (image, text) not in memo:
            memo[(image, text)] = caption_is_true(feats.texts[text], scene_of[image])
        return memo[(image, text)]

    out: dict[str, float] = {}
    extra: dict[str, float] = {}
    for direction, sim in (("tr", cos), ("ir", cos.t())):
        k_dir = min(k, sim.shape[1])
        top_cos, cand = torch.sort(sim, dim=1, descending=True, stable=True)
        top_cos, cand = top_cos[:, :k_dir], cand[:, :k_dir]
        queries = torch.arange(sim.shape[0]).repeat_interleave(k_dir)
        if direction == "tr":
            images, texts = queries, cand.reshape(-1)
        else:
            images, texts = cand.reshape(-1), queries
        right = partial(_is_right, direction, feats.txt2img)
        logits = itm_pair_logits(model, feats, images, texts, 128)
        itm = {name: itm_score(logits, name).view(-1, k_dir) for name in RERANK_SCORES}
        truth = torch.tensor(
            [true(int(i), int(t)) for i, t in zip(images, texts, strict=True)]
        ).view(-1, k_dir)
        ranked = {
            "itc": top_cos,
            "blip": itm["blip"] + top_cos,
            "log_odds": itm["log_odds"] + top_cos / temp,
            "log_prob": itm["log_prob"] + top_cos / temp,
            "itm": itm["log_odds"],
            "truth": truth.float(),
        }
        for name, scores in ranked.items():
            hits = right(_first_of(scores, cand)).float().mean().item()
            out[name] = out.get(name, 0.0) + 100 * hits / 2
        first_true = truth[:, 0]
        first_right = right(cand[:, 0])
        extra[f"{direction}_first_false"] = 100 * (~first_true).float().mean().item()
        extra[f"{direction}_first_true_other"] = (
            100 * (first_true & ~first_right).float().mean().item()
        )
        extra[f"{direction}_truth_r1"] = (
            100 * right(_first_of(truth.float(), cand)).float().mean().item()
        )
        extra[f"{direction}_itc_r1"] = 100 * first_right.float().mean().item()
    return {**out, **extra}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    test = folder / "data" / "test"
    if not test.is_dir() or not (folder / "recipe.yaml").is_file():
        raise SystemExit(f"{folder}: no data/test or recipe.yaml (a demo folder?)")
    # the folder's own evaluation settings, so that the re-rank columns are its eval's figures
    recipe = load_recipe(str(folder / "recipe.yaml"))
    k = recipe.eval.k if args.k is None else args.k
    scenes = {
        s.key: s.meta["truth"]["scene"]
        for s in read_samples(expand_shards([str(test)]))
        if isinstance(s.meta.get("truth"), dict)
    }
    if not scenes:
        raise SystemExit(f"{test}: no stored scenes (the truth judge needs the built-in benchmark)")
    if args.runs:
        models = [folder / "runs" / f"pretrain_{r}" / "model" for r in args.runs.split(",")]
    else:
        models = sorted(p / "model" for p in (folder / "runs").glob("pretrain_*"))
    models += [Path(m) for m in args.model]
    missing = [str(m) for m in models if not m.exists()]
    if missing:
        raise SystemExit(f"no model folder: {', '.join(missing)}")
    print(f"mean R@1 on {test} ({len(scenes)} images), ITC top {k} re-ranked by:")
    print(f"{'model':<40}" + "".join(f"{s:>10}" for s in SCHEMES))
    results = {}
    for model_dir in models:
        r = score_model(str(model_dir), test, scenes, k, recipe.data.max_words)
        name = str(model_dir.parent.name if model_dir.name == "model" else model_dir)
        results[name] = r
        print(f"{name:<40}" + "".join(f"{r[s]:10.2f}" for s in SCHEMES))
        print(
            f"{'':<40}ITC's first text for an image: false of it {r['tr_first_false']:.1f}%, true "
            f"but another image's {r['tr_first_true_other']:.1f}%; text R@1 ITC "
            f"{r['tr_itc_r1']:.1f} -> truth judge {r['tr_truth_r1']:.1f} (image R@1 "
            f"{r['ir_itc_r1']:.1f} -> {r['ir_truth_r1']:.1f}; ITC's first image false of the text "
            f"{r['ir_first_false']:.1f}%)"
        )

    if args.json:
        Path(args.json).write_text(json.dumps({"k": k, "models": results}, indent=1))


if __name__ == "__main__":
    main()
