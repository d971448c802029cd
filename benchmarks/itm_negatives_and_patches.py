"""Why the demo's filter is unsure and its captioner names the wrong shapes: two controlled comparisons.

    python benchmarks/itm_negatives_and_patches.py --demo DEMO_OUT          # both parts, ~6 min on 1 core
    python benchmarks/itm_negatives_and_patches.py --demo DEMO_OUT --part itm --steps 100

``DEMO_OUT`` is the output folder of ``capfilt demo`` (its ``data/`` shards of the built-in world and
its ``runs/pretrain_baseline``); nothing in it is written.

(a) ``itm``: the baseline model fine-tuned with ITC + ITM for ``--steps`` steps (batch 64, AdamW) on the
    human shards, three ways that differ only in how the ITM negatives are drawn: BLIP's hard
    negatives (``softmax(sim)``), hard negatives at half the similarity scale ("soft"), and uniform
    random negatives. The negative sampler is swapped in the model module for the run (a diagnostic;
    the library has no option for it). Printed: the mean ITM loss, the AUC of p(match) between clean
    and noisy web texts (truth known in this world), and the mean p(match) of clean and noisy texts
    and of random pairs — BLIP's threshold 0.5 needs clean texts above it and noisy ones below.
(b) ``vision``: can the demo's ViT (width 128, 3 layers) learn which shapes a scene holds? Trained
    with a supervised multi-label head for ``--vision-steps`` steps, same data and seed, at the demo's
    48 px / patch 8 (36 patches), 64 px / patch 8 and 48 px / patch 6 (64 patches each). Printed: the
    fraction of test scenes whose set of shapes is predicted exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import random
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import capfilt.model.med as med
from capfilt.config import ModelConfig
from capfilt.data.transforms import EvalTransform, eval_transform_for
from capfilt.model.losses import sample_itm_negatives
from capfilt.model.tokenizer import tokenize
from capfilt.runs.resolve import load_stage_model

SHAPES = ("circle", "square", "triangle", "diamond", "cross")


def load_split(transform, shards: list[Path], limit: int | None = None):
    """(images [N, 3, S, S], captions per image, scene dicts, clean flags) from synth shards."""
    images, captions, scenes, clean = [], [], [], []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(members):
                if not name.endswith(".json"):
                    continue
                meta = json.load(tar.extractfile(members[name]))
                jpg = tar.extractfile(members[name[:-5] + ".jpg"]).read()
                images.append(transform(Image.open(io.BytesIO(jpg)).convert("RGB")))
                captions.append([c["text"] for c in meta["captions"]])
                scenes.append(meta["truth"]["scene"])
                clean.append(bool(meta["truth"]["clean"]))
                if limit and len(images) >= limit:
                    return torch.stack(images), captions, scenes, clean
    return torch.stack(images), captions, scenes, clean


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def random_negatives(sim_i2t, sim_t2i, image_ids, generator=None, mode="hard"):
    return sample_itm_negatives(sim_i2t, sim_t2i, image_ids, generator, mode="random")


def soft_negatives(sim_i2t, sim_t2i, image_ids, generator=None, mode="hard"):
    return sample_itm_negatives(sim_i2t * 0.5, sim_t2i * 0.5, image_ids, generator, mode="hard")


SAMPLERS = {"hard": sample_itm_negatives, "soft": soft_negatives, "random": random_negatives}


def itm_run(demo: Path, sampler: str, steps: int, lr: float) -> dict:
    torch.manual_seed(0)
    rng = random.Random(0)
    model, tok, cfg, meta, _ = load_stage_model(
        demo / "runs/pretrain_baseline", torch.device("cpu")
    )
    tf = eval_transform_for(meta, cfg)
    human = load_split(tf, sorted((demo / "data/human").glob("*.tar")))
    web_shards = sorted((demo / "data/web").glob("*.tar"))
    web = load_split(tf, web_shards[-1:], limit=400)

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            embeds = model.encode_image(web[0])
            ids, mask = tokenize(tok, [c[0] for c in web[1]], cfg.max_text_len)
            p = model.itm_logits(embeds, ids, mask).softmax(-1)[:, 1]
            perm = torch.roll(torch.arange(len(ids)), 13)
            p_rand = model.itm_logits(embeds[perm], ids, mask).softmax(-1)[:, 1]
        model.train()
        is_clean = torch.tensor(web[3])
        return {
            "auc_web": round(auc(p[is_clean], p[~is_clean]), 3),
            "p_clean": round(p[is_clean].mean().item(), 2),
            "p_noisy": round(p[~is_clean].mean().item(), 2),
            "p_random_pair": round(p_rand.mean().item(), 2),
        }

    start = evaluate()
    original = med.sample_itm_negatives
    med.sample_itm_negatives = SAMPLERS[sampler]
    try:
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05
        )
        gen = torch.Generator().manual_seed(0)
        model.train()
        losses = []
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = rng.sample(range(len(human[1])), 64)
            ids, mask = tokenize(tok, [rng.choice(human[1][i]) for i in idx], cfg.max_text_len)
            out = model.forward_pretrain(
                human[0][idx],
                ids,
                mask,
                image_ids=torch.tensor(idx),
                weights=("itc", "itm"),
                generator=gen,
            )
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            model.momentum_update()
            losses.append(out["loss_itm"].item())
        seconds = time.perf_counter() - t0
    finally:
        med.sample_itm_negatives = original
    tail = losses[-max(1, steps // 4) :]
    return {
        "start": start,
        "end": evaluate(),
        "itm_loss_last_quarter": round(sum(tail) / len(tail), 3),
        "s": round(seconds),
    }


def vision_run(demo: Path, size: int, patch: int, steps: int) -> float:
    torch.manual_seed(0)
    rng = random.Random(0)
    tf = EvalTransform(size)

    def labels(scenes):
        y = torch.zeros(len(scenes), len(SHAPES))
        for i, scene in enumerate(scenes):
            for obj in scene["objects"]:
                y[i, SHAPES.index(obj["shape"])] = 1
        return y

    train = load_split(
        tf,
        sorted((demo / "data/human").glob("*.tar")) + sorted((demo / "data/web").glob("*.tar"))[:4],
    )
    test = load_split(tf, sorted((demo / "data/test").glob("*.tar")))
    y_train, y_test = labels(train[2]), labels(test[2])
    cfg = dataclasses.replace(
        ModelConfig(),
        image_size=size,
        patch_size=patch,
        vision_width=128,
        vision_depth=3,
        vision_heads=2,
    )
    vit, head = med.build_vit(cfg, 0.0), torch.nn.Linear(128, len(SHAPES))
    opt = torch.optim.AdamW(
        list(vit.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.05
    )

    def logits(x):
        return head(vit.forward_features(x)[:, 1:].mean(1))

    for _ in range(steps):
        idx = rng.sample(range(len(y_train)), 64)
        loss = F.binary_cross_entropy_with_logits(logits(train[0][idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = logits(test[0]) > 0
    return float((pred == y_test.bool()).all(1).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--demo", type=Path, required=True, help="output folder of `capfilt demo`")
    ap.add_argument("--part", choices=("itm", "vision", "both"), default="both")
    ap.add_argument("--steps", type=int, default=100, help="ITM fine-tuning steps per sampler")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vision-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("itm", "both"):
        for sampler in ("hard", "soft", "random"):
            print(
                f"ITM negatives {sampler:6s} lr {args.lr:g} {args.steps} steps:",
                itm_run(args.demo, sampler, args.steps, args.lr),
                flush=True,
            )
    if args.part in ("vision", "both"):
        for size, patch in ((48, 8), (64, 8), (48, 6)):
            exact = vision_run(args.demo, size, patch, args.vision_steps)
            print(
                f"ViT {size} px / patch {patch} ({(size // patch) ** 2} patches), {args.vision_steps} steps: shape set exact {exact:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
