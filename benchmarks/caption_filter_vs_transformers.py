"""capfilt's caption and filter stages vs the same model run through transformers' BLIP classes.

    python benchmarks/caption_filter_vs_transformers.py                  # demo-size model, 256 images
    python benchmarks/caption_filter_vs_transformers.py --size medium    # 4+4 layers of width 256, 64 px
    python benchmarks/caption_filter_vs_transformers.py --recipe tiny --images 128 --threads 2
    python benchmarks/caption_filter_vs_transformers.py --captioner runs/cap/model --filter runs/filt/model
    bash benchmarks/race_captioner.sh /tmp/rc && \
        python benchmarks/caption_filter_vs_transformers.py --captioner /tmp/rc/cap/model --only caption
    python benchmarks/caption_filter_vs_transformers.py --recipe blip-base --vocab 30522 \
        --set model.vision_checkpoint=null --set model.text_checkpoint=null --set model.tokenizer=null

The model has the recipe's dimensions (``--size medium`` widens it; random weights, or the given
capfilt folders) and is converted to ``BlipForConditionalGeneration`` / ``BlipForImageTextRetrieval``
with :func:`capfilt.model.convert.transformers_io.med_to_hf`, so both sides run the same weights in
the same process. transformers' BLIP pools the image and the text by their [CLS] tokens, so a
random-weight model is built with ``image_pool: cls`` and ``text_pool: cls`` (a recipe's ``mean``
only changes the ITC features, which the exported classes cannot express; the ITM and the
captioner are the same either way) and without
the recipe's ``vision_stem`` (transformers' ViT has only the linear patch embedding; the token grid
is the same). Each side
runs ``--repeats`` times, alternating, and the fastest run of each is compared. On a GPU both sides
run under the same bf16 autocast (capfilt's stages' own precision) and are timed by the wall clock.

(a) Captioning, images/s: capfilt's ``generate_captions`` (nucleus top-p, repetition penalty,
    min/max length and batch size of the recipe's ``caption`` section, prompt "a picture of ")
    vs ``BlipForConditionalGeneration.generate(do_sample=True, top_p, top_k=0,
    repetition_penalty, min_new_tokens, max_new_tokens)`` on the same batches. The two draw
    different random numbers (capfilt's per-key counter-based draws), so the mean caption length
    of both is printed (the work per caption); greedy decoding on the first batch checks that both
    sides run the same model (identical captions, count printed). A random-weight captioner has not
    learnt to end a caption, so its rows run to ``max_length`` on both sides; a trained one's end
    at different steps, where capfilt's finished rows leave the batch and transformers' stay in
    it until the last is done (``benchmarks/race_captioner.sh`` trains a demo-size one). With ``--set caption.compile=true``
    capfilt's decoder steps run compiled; the greedy check, before the timed runs, pays the compile.
    With ``--set caption.cuda_graphs=true`` (on a GPU) capfilt replays each decoding step as a
    captured CUDA graph; the greedy check pays the capture. ``--only caption`` stops after (a).
(b) Filtering, texts/s: capfilt's ``score_pairs`` (one image-encoder pass and one cross-attention
    key/value projection per image; the batch's texts in order of length, ``filter.batch_size`` at
    a time, each chunk padded to its own longest, as the stage runs it), twice: ITM only (the
    stage's default with rule ``itm``, the output theirs gives) and ITM probability and ITC cosine
    (``filter.itc_cosine: true``, as the demo records both), on batches of the recipe's ``filter.batch_size`` images with 2 texts each (a
    web text and a synthetic caption) vs ``BlipForImageTextRetrieval(input_ids, pixel_values, use_itm_head=True)``
    on the same batches (every pair's image and padded text ids in one call, as a batched user of
    that class would). The largest ITM probability difference between the two is printed as a check.

After (a) and after (b), each side's image encoder is timed alone on the same batches, and each
side's time is split into that and the rest (:func:`split_report`): in captioning the rests are
the decoding, whose ratio is what capfilt's text stack is worth on its own, and (their total) /
(our image encoder) is the most the total ratio could reach.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from capfilt.config import load_recipe
from capfilt.data.reader import read_samples
from capfilt.data.shards import expand_shards
from capfilt.data.synth import write_synth
from capfilt.data.transforms import EvalTransform
from capfilt.model import build_model, pad_vocabulary, tokenize, train_wordpiece_tokenizer
from capfilt.model.convert.transformers_io import med_to_hf
from capfilt.model.decoding import row_seeds
from capfilt.model.generate import generate_captions
from capfilt.pipeline.filter import score_pairs
from capfilt.runs.resolve import load_stage_model
from capfilt.utils.device import autocast


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--recipe", default="demo", help="recipe giving the model size and caption/filter settings"
    )
    p.add_argument("--images", type=int, default=256, help="images captioned and filtered")
    p.add_argument(
        "--captioner", default=None, help="capfilt captioner folder (default: random weights)"
    )
    p.add_argument("--filter", default=None, help="capfilt filter folder (default: random weights)")
    p.add_argument(
        "--data",
        default="/tmp/capfilt-bench/vs-transformers",
        help="cache folder of the synthetic images",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vocab",
        type=int,
        default=0,
        help="pad the trained tokenizer with unused tokens to this size (30522: BERT-base's "
        "vocabulary, for blip-base without the hub)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE"
    )
    p.add_argument(
        "--size",
        choices=("recipe", "medium"),
        default="recipe",
        help="model dimensions: the recipe's, or MEDIUM (random weights only)",
    )
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side (alternating)")
    p.add_argument(
        "--only",
        choices=("caption",),
        default=None,
        help="race the captioners only (not the filters)",
    )
    p.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default=None,
        help="process CPU time or wall time (default: cpu on a CPU, wall on a GPU)",
    )
    return p.parse_args()


MEDIUM = dict(
    image_size=64,
    patch_size=8,
    vision_width=256,
    vision_depth=4,
    vision_heads=4,
    text_width=256,
    text_layers=4,
    text_heads=4,
    text_intermediate=1024,
    vocab_size=2000,
)
"""``--size medium``: 64 image tokens, 4 + 4 layers of width 256."""


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
"""``--clock``: process CPU time is the steadier figure on a shared machine (one intra-op thread:
CPU time is the work done); wall time is what a user waits on an idle one."""


def _race(ours_fn, theirs_fn, repeats: int, clock):
    """Alternate the two sides ``repeats`` times; (our result, best time, their result, best time)."""
    t_ours = t_theirs = float("inf")
    for _ in range(repeats):
        for fn, side in ((ours_fn, "ours"), (theirs_fn, "theirs")):
            start = clock()
            result = fn()
            elapsed = clock() - start
            if side == "ours":
                ours, t_ours = result, min(t_ours, elapsed)
            else:
                theirs, t_theirs = result, min(t_theirs, elapsed)
    return ours, t_ours, theirs, t_theirs


def image_encoder_seconds(encode, pixels: torch.Tensor, batch: int, repeats: int, clock, device):
    """Best time of ``encode`` (a side's image encoder alone) over ``pixels`` in batches."""
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = clock()
        with torch.inference_mode(), autocast(device):
            for i in range(0, len(pixels), batch):
                encode(pixels[i : i + batch])
        _synchronize(device)  # the wall clock on a GPU: the work done, not only queued
        best = min(best, clock() - start)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def split_report(t_ours, t_theirs, model, hf, pixels, batch, repeats, clock_name, device) -> str:
    """Each side's time as one image-encoder pass per image + the rest.

    A side encodes each image at least once with the same ViT, so neither can be faster than
    that: (their total) / (our encoder) bounds the ratio were all our other work free. The rest
    is the text work (decoding; text passes and ITM), and for transformers' filter also its
    second encoding of each image (it encodes an image once per text).
    """
    clock = CLOCKS[clock_name]
    images_ours = image_encoder_seconds(model.encode_image, pixels, batch, repeats, clock, device)
    images_theirs = image_encoder_seconds(hf.vision_model, pixels, batch, repeats, clock, device)
    text_ours, text_theirs = t_ours - images_ours, t_theirs - images_theirs
    return (
        f"  image encoder alone: capfilt {images_ours:.2f} s, transformers {images_theirs:.2f} s | "
        f"the rest: capfilt {text_ours:.2f} s, transformers {text_theirs:.2f} s, "
        f"ratio {text_theirs / max(text_ours, 1e-9):.2f}x | total ratio at most "
        f"{t_theirs / images_ours:.2f}x were all the rest of ours free"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.overrides)
    model_cfg = dataclasses.replace(
        recipe.model,
        image_pool="cls",
        text_pool="cls",
        vision_stem=[],
        **(MEDIUM if args.size == "medium" else {}),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.clock = args.clock or ("wall" if device.type == "cuda" else "cpu")

    data_dir = Path(args.data) / f"{recipe.name}-{args.images}"
    write_synth(data_dir, dataclasses.replace(recipe.synth, n_human=0, n_web=0, n_test=args.images))
    samples = list(read_samples(expand_shards([str(data_dir / "test")])))[: args.images]
    texts = [c["text"] for s in samples for c in s.captions]

    models = {}
    tokenizer = None
    for kind, path in (("captioner", args.captioner), ("filter", args.filter)):
        if path:
            model, tokenizer, cfg, *_ = load_stage_model(path, torch.device("cpu"))
        else:
            if tokenizer is None:
                tokenizer = pad_vocabulary(
                    train_wordpiece_tokenizer(texts, model_cfg.vocab_size), args.vocab
                )
            cfg = model_cfg
            torch.manual_seed(args.seed)
            model = build_model(cfg, tokenizer)
        models[kind] = (
            model.eval().to(device),
            med_to_hf(model, cfg, kind).to(device),
            tokenizer,
            cfg,
        )

    def images_for(cfg):
        transform = EvalTransform(cfg.image_size)
        return torch.stack([transform(s.image) for s in samples]).to(device)

    print(
        f"{len(samples)} images; model of recipe '{recipe.name}'"
        f"{' at size medium' if args.size == 'medium' else ''} "
        f"({'given folders' if args.captioner or args.filter else 'random weights'}); device {device}, "
        f"{torch.get_num_threads()} threads; {args.clock} time, best of {args.repeats} alternating runs"
    )

    # (a) captioning ---------------------------------------------------------------------------
    model, hf, tok, cfg = models["captioner"]
    pixels = images_for(cfg)
    cc = recipe.caption
    settings = dataclasses.replace(cc, method="nucleus")
    sp = model.special
    bs = cc.batch_size
    batches = [pixels[i : i + bs] for i in range(0, len(pixels), bs)]

    keys = [s.key for s in samples]

    def capfilt_caption(settings=settings):
        out = []
        with torch.inference_mode(), autocast(device):
            for start in range(0, len(pixels), bs):
                seeds = row_seeds(args.seed, keys[start : start + bs])
                batch = pixels[start : start + bs]
                out += [c[0] for c in generate_captions(model, tok, batch, settings, 1, seeds)]
        return out

    prompt = tok(cc.prompt.strip(), return_tensors="pt")

    def hf_caption(sample=True):
        torch.manual_seed(args.seed)
        out = []
        with torch.inference_mode(), autocast(device):
            for batch in batches:
                ids = prompt["input_ids"].expand(len(batch), -1).to(device)
                gen = hf.generate(
                    pixel_values=batch,
                    input_ids=ids.clone(),
                    attention_mask=torch.ones_like(ids),
                    do_sample=sample,
                    top_p=cc.top_p if sample else None,
                    top_k=0 if sample else None,
                    temperature=cc.temperature if sample else None,
                    repetition_penalty=cc.repetition_penalty,
                    min_new_tokens=cc.min_length,
                    max_new_tokens=cc.max_length,
                    suppress_tokens=[sp["pad"], sp["cls"], sp["enc"], sp["dec"]],
                )
                out += tok.batch_decode(gen[:, ids.shape[1] - 1 :], skip_special_tokens=True)
        return out

    # same model on both sides: greedy captions of the first batch agree
    first, batches = batches, batches[:1]
    greedy_ours = capfilt_caption(dataclasses.replace(settings, method="greedy"))[: len(batches[0])]
    greedy_theirs = hf_caption(sample=False)
    batches = first
    same = sum(a == b.strip() for a, b in zip(greedy_ours, greedy_theirs, strict=True))
    ours, t_ours, theirs, t_theirs = _race(
        capfilt_caption, hf_caption, args.repeats, CLOCKS[args.clock]
    )
    n = len(pixels)
    words = lambda caps: sum(len(c.split()) for c in caps) / max(1, len(caps))  # noqa: E731
    print(
        f"caption{' (compiled decoder)' if cc.compile else ''}{' (CUDA graphs)' if cc.cuda_graphs and device.type == 'cuda' else ''}: capfilt {n / t_ours:8.1f} images/s ({t_ours:.2f} s, {words(ours):.1f} words/caption) | "
        f"transformers generate {n / t_theirs:8.1f} images/s ({t_theirs:.2f} s, {words(theirs):.1f} words/caption) | "
        f"ratio {t_theirs / t_ours:.2f}x   [batch {bs}, top-p {cc.top_p}, rep. penalty {cc.repetition_penalty}, "
        f"length {cc.min_length}-{cc.max_length}; greedy check: {same}/{len(greedy_ours)} captions identical]"
    )
    print(split_report(t_ours, t_theirs, model, hf, pixels, bs, args.repeats, args.clock, device))

    if args.only == "caption":
        return

    # (b) filtering -----------------------------------------------------------------------------
    model, hf, tok, cfg = models["filter"]
    pixels = images_for(cfg)
    pair_texts = [(i, s.captions[0]["text"]) for i, s in enumerate(samples)]
    pair_texts += [
        (i, samples[(i + 1) % n].captions[-1]["text"]) for i in range(n)
    ]  # a "synthetic" second text
    pair_texts.sort(key=lambda p: p[0])
    fb = recipe.filter.batch_size

    def capfilt_filter(with_cosine=True):
        scores = []
        with torch.inference_mode(), autocast(device):
            for start in range(0, n, fb):
                chunk = [(i, t) for i, t in pair_texts if start <= i < start + fb]
                index = torch.tensor([i - start for i, _ in chunk], device=device)
                itm, _ = score_pairs(
                    model,
                    tok,
                    pixels[start : start + fb],
                    index,
                    [t for _, t in chunk],
                    cfg.max_text_len,
                    with_cosine=with_cosine,
                    chunk_rows=fb,  # as the stage: texts in order of length, fb at a time
                ).wait()
                scores.append(itm.float().cpu())  # the result on the host, as theirs
        return torch.cat(scores)

    enc_id = model.special["enc"]

    def hf_filter():
        scores = []
        with torch.inference_mode(), autocast(device):
            for start in range(0, n, fb):
                chunk = [(i, t) for i, t in pair_texts if start <= i < start + fb]
                ids, mask = tokenize(tok, [t for _, t in chunk], cfg.max_text_len)
                ids[:, 0] = enc_id  # BLIP's ITM input starts with [ENC]
                index = torch.tensor([i for i, _ in chunk], device=device)
                out = hf(
                    input_ids=ids.to(device),
                    pixel_values=pixels[index],
                    attention_mask=mask.to(device),
                    use_itm_head=True,
                )
                scores.append(out.itm_score.float().softmax(-1)[:, 1].cpu())
        return torch.cat(scores)

    with torch.inference_mode(), autocast(device):
        score_pairs(
            model,
            tok,
            pixels[:2],
            torch.arange(2, device=device),
            [t for _, t in pair_texts[:2]],
            cfg.max_text_len,
        ).wait()
        hf(
            input_ids=torch.tensor([[enc_id, sp["sep"]]], device=device),
            pixel_values=pixels[:1],
            use_itm_head=True,
        )
    m = len(pair_texts)
    # rule itm scores ITM only by default, the same output as transformers' ITM head;
    # filter.itc_cosine: true also records each text's ITC cosine (one more text pass)
    for label, with_cosine in (("ITM only", False), ("ITM + cosine", True)):
        ours, t_ours, theirs, t_theirs = _race(
            lambda w=with_cosine: capfilt_filter(w), hf_filter, args.repeats, CLOCKS[args.clock]
        )
        print(
            f"filter ({label}):  capfilt {m / t_ours:8.1f} texts/s ({t_ours:.2f} s) | transformers ITM batched "
            f"{m / t_theirs:8.1f} texts/s ({t_theirs:.2f} s) | ratio {t_theirs / t_ours:.2f}x   [{m} texts, 2 per "
            f"image, batch {fb} images; max |ITM prob difference| {float((ours.cpu() - theirs).abs().max()):.1e}]"
        )
    print(split_report(t_ours, t_theirs, model, hf, pixels, fb, args.repeats, args.clock, device))


if __name__ == "__main__":
    main()
