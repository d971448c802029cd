"""Operators per caption decoding step: what a GPU launches for one token of every row.

    python benchmarks/decode_step_ops.py                    # blip-base depth, tiny widths, CPU
    python benchmarks/decode_step_ops.py --recipe demo

One step of nucleus sampling (token choice, then the decoder on the chosen tokens) runs once in
the eager loop (``capfilt.model.generate.sample_tokens``' step) and once in the fixed-shape step
that ``caption.cuda_graphs`` captures (``capfilt.model.decode_graph``), under a dispatch mode that
counts the ATen operators. Views (``view``, ``transpose``, ``expand``, ...) change no data and
launch nothing; the rest each launch at least one kernel on a GPU. The count depends on the
depth of the text stack, not on its width, so the recipe's layers run at a tiny width (the count
is that of the full-size model; on a CPU the eager loop's one-query attention is two matmuls and a
softmax, where a GPU runs one fused kernel). On a GPU a step whose arithmetic is small (a
BLIP-base decoder at batch 128) costs about (operators) x (the host's time to launch one), which a
CUDA graph replaces by one launch.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from capfilt.config import load_recipe
from capfilt.model import build_model, train_wordpiece_tokenizer
from capfilt.model.decode_graph import StaticDecoder
from capfilt.model.decoding import choose_tokens, decoder_step, row_seeds
from capfilt.model.generate import prompt_ids
from capfilt.model.text import KVCache

VIEWS = {
    "view", "_unsafe_view", "_reshape_alias", "as_strided", "alias", "t", "transpose", "permute",
    "expand", "unsqueeze", "squeeze", "select", "slice", "unbind", "split", "split_with_sizes",
    "detach", "empty", "empty_like", "empty_strided",
}  # fmt: skip
"""Operators that launch no kernel (metadata only, or an allocation)."""


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def launching(self) -> int:
        return sum(n for name, n in self.counts.items() if name not in VIEWS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="blip-base")
    p.add_argument("--batch", type=int, default=4, help="rows (the count does not depend on it)")
    args = p.parse_args()
    width = [
        "model.text_width=48", "model.text_heads=12", "model.text_intermediate=96",
        "model.vision_width=48", "model.vision_heads=12", "model.image_size=32",
        "model.patch_size=16", "model.vision_stem=[]", "model.embed_dim=16",
        "model.vision_checkpoint=null", "model.text_checkpoint=null", "model.tokenizer=null",
    ]  # fmt: skip
    recipe = load_recipe(args.recipe, width)
    tok = train_wordpiece_tokenizer(["a picture of a red square left of a blue circle"] * 8, 120)
    torch.manual_seed(0)
    model = build_model(recipe.model, tok).eval()
    settings = dataclasses.replace(recipe.caption, method="nucleus", min_length=0)
    n = args.batch
    with torch.inference_mode():
        images = torch.randn(n, 3, recipe.model.image_size, recipe.model.image_size)
        cross_kv = model.image_cross_kv(model.encode_image(images))
        start = prompt_ids(model, tok, settings.prompt, n, images.device)
        seeds = row_seeds(0, [str(i) for i in range(n)])

        cache = KVCache(start.shape[1] + settings.max_length)
        logits = decoder_step(model, start, cross_kv, cache)
        with CountOps() as eager:
            token = choose_tokens(model, logits, start, settings, seeds, 0)
            decoder_step(model, token.unsqueeze(1), cross_kv, cache)

        fixed = StaticDecoder(model, settings, n, start.shape[1], cross_kv, graph=False)
        fixed._reset(start, cross_kv, seeds)
        with CountOps() as captured:
            fixed._body()

    layers = recipe.model.text_layers
    print(f"recipe {args.recipe}: text stack of {layers} layers; operators in one decoding step")
    for label, mode in (("eager loop", eager), ("fixed-shape step (captured)", captured)):
        print(
            f"  {label:28s} {sum(mode.counts.values()):5d} in all, {mode.launching():5d} launching "
            "a kernel"
        )


if __name__ == "__main__":
    main()
