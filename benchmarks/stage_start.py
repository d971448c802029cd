"""How long an inference stage takes from its call to its first batch of images: as capfilt's
stages start now against as they started before (the baseline).

    python benchmarks/stage_start.py                      # BLIP-base, random weights (1.8 GB)
    python benchmarks/stage_start.py --size tiny --repeats 5
    python benchmarks/stage_start.py --size tiny --command --stage caption --workers 1 --copies 4
    python benchmarks/stage_start.py --format transformers --stage caption   # BLIP's hub layout

Before its first batch a stage loads its model, names it by a hash of its weights, and starts
its loader's workers. Four things changed:

- the model is built without drawing random initial weights, which the weights file then
  overwrites (``load_model_folder``: built on the meta device, then given memory); with
  ``--format transformers`` the model is a transformers BLIP folder (a hub checkpoint's layout,
  converted at every start), and the change is the same in its import: only the few heads the
  checkpoint lacks are initialised (``fill_med``), no longer the whole model;
- the model leaves its training state (momentum copies, queues) behind
  (``load_model_folder(inference=True)``, ``MED.drop_training_state``): neither copied nor
  carried to the device;
- the weights are hashed (``model_fingerprint``) on a thread while they load
  (``load_identified_model``), not after;
- the fork server that the loader workers are forked from, which first imports torch,
  torchvision and capfilt (2-3 s on this machine), starts before the model loads
  (``start_worker_server``), not when the first batch is wanted (what a DataLoader does).

Each run is a fresh Python process (a process starts its fork server once) that calls the
stage's library function (``filter_shards`` or ``caption_shards``) on coco-mini's photos and
stops at its first batch; the two ways alternate, ``--repeats`` runs each. The baseline patches
all four back. With ``--command`` each run is the whole ``capfilt STAGE`` command instead (the
demo recipe's settings), timed from the process's start to its exit: the command starts the fork
server before it imports torch and the stage, so that the server's imports also run beside its
own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Nothing heavy at the top: a `--command` baseline run imports this module first (patch_back),
# and the command it times must import no more than the command itself did.

WAYS = ("now", "before")
IMPORT_THIS = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import stage_start"
CHILD = f"{IMPORT_THIS}; stage_start.main()"
BEFORE_COMMAND = (
    f"{IMPORT_THIS}; stage_start.patch_back({{stage!r}}); "
    "from capfilt.cli.main import main; sys.argv[0] = 'capfilt'; main()"
)
"""The command as it ran before: the CLI imported the stage (torch) first, as patch_back does."""


class FirstBatch(BaseException):
    """Raised at the first batch: a BaseException, so the stage does not record a failed shard."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from stage_host_cost import add_photo_args  # same folder: run as a script

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_photo_args(p)
    p.set_defaults(copies=1)
    p.add_argument("--stage", choices=("filter", "caption"), default="filter")
    p.add_argument(
        "--size",
        choices=("blip-base", "tiny"),
        default="blip-base",
        help="the model: BLIP-base's (ViT-B/16, two BERT-base text stacks, 30,522 tokens: 447 M "
        "parameters) or the tiny recipe's; random weights either way",
    )
    p.add_argument(
        "--format",
        choices=("capfilt", "transformers"),
        default="capfilt",
        help="the model's folder: capfilt's, or transformers' BLIP captioner/filter (what "
        "`--model Salesforce/blip-...` loads), converted as the stage starts",
    )
    p.add_argument("--workers", type=int, default=2, help="the stage's loader workers")
    p.add_argument("--batch", type=int, default=32, help="the stage's batch size")
    p.add_argument("--repeats", type=int, default=3, help="runs per way (alternating)")
    p.add_argument(
        "--command",
        action="store_true",
        help="time the whole `capfilt STAGE` command to its end instead (process start to exit; "
        "the server then starts before the command's imports; use with --size tiny)",
    )
    p.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def blip_base_model(folder: Path) -> None:
    import torch

    from capfilt.config import load_recipe
    from capfilt.data.transforms import preprocess_spec
    from capfilt.model import (
        build_model,
        pad_vocabulary,
        save_model_folder,
        train_wordpiece_tokenizer,
    )

    cfg = load_recipe(
        "blip-base",
        ["model.vision_checkpoint=null", "model.text_checkpoint=null", "model.tokenizer=null"],
    ).model
    texts = ["a photo of a cat on a bench", "two dogs playing in the snow"]
    tok = pad_vocabulary(train_wordpiece_tokenizer(texts * 50, 300), 30522)
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    save_model_folder(folder, model, tok, cfg, "pretrain", preprocess=preprocess_spec(224))


def patch_back(stage_name: str):
    """Make the stage start as it did before (the baseline) and return its module: no fork server
    until its loader starts (the command's and the stage's calls do nothing), random weights
    drawn when the model is built for loading (or for a transformers folder's import: every
    tensor, from the import's seed), its training state kept, the weights hashed after the
    loading."""
    import importlib

    import capfilt.data.workers as workers_mod

    workers_mod.start_worker_server = lambda num_workers: None
    import capfilt.model.folder as folder_mod
    import capfilt.runs.resolve as resolve_mod
    from capfilt.model import MED, build_model
    from capfilt.model.med import is_training_state
    from capfilt.runs.resolve import load_stage_model, model_fingerprint

    MED.drop_training_state = lambda self: None

    def load_as_before(folder, device, inference=False):
        """The model folder loader before: random weights, then the file's tensors copied in."""
        import json

        from safetensors import safe_open

        from capfilt.config import ModelConfig, from_dict
        from capfilt.model import load_tokenizer

        meta = folder_mod.read_meta(folder)
        cfg = from_dict(ModelConfig, json.loads((folder / folder_mod.CONFIG).read_text()))
        tokenizer = load_tokenizer(str(folder))
        model = build_model(cfg, tokenizer, pretrained=False)
        folder_mod.apply_folder_settings(model, meta)
        with safe_open(str(folder / folder_mod.WEIGHTS), framework="pt", device="cpu") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        model.load_state_dict(tensors, strict=False)
        if any(k not in tensors for k in model.state_dict() if is_training_state(k)):
            model.copy_params()
            model.reset_queues()
        return model.to(device).eval(), tokenizer, cfg, meta

    resolve_mod.load_model_folder = load_as_before

    stage = importlib.import_module(f"capfilt.pipeline.{stage_name}")

    def load_then_hash(path, device):
        model, tokenizer, cfg, meta, folder = load_stage_model(path, device)
        model_id = f"{meta.get('stage', 'model')}-{model_fingerprint(folder)}"
        return model, tokenizer, cfg, meta, folder, model_id

    stage.start_worker_server = workers_mod.start_worker_server
    stage.load_identified_model = load_then_hash

    import torch

    import capfilt.model.convert.transformers_io as transformers_io

    def seeded_full_build(cfg, tokenizer, vocab_size):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build_model(cfg, tokenizer, pretrained=False)

    transformers_io.new_med = seeded_full_build
    return stage


def child(args: argparse.Namespace) -> None:
    """One stage call up to its first batch; prints the seconds as JSON."""
    import importlib

    from capfilt.config import load_recipe
    from capfilt.data.loader import ShardImages

    if args.child == "before":
        stage = patch_back(args.stage)
    else:
        stage = importlib.import_module(f"capfilt.pipeline.{args.stage}")
    inputs = Path(args.inputs)
    seconds: dict[str, float] = {}
    load = stage.load_identified_model

    def timed_load(*a, **kw):
        began = time.perf_counter()
        loaded = load(*a, **kw)
        seconds["model"] = time.perf_counter() - began
        return loaded

    stage.load_identified_model = timed_load
    batches = ShardImages.batches

    def first_batch(self, *a, **kw):
        for _ in batches(self, *a, **kw):
            seconds["first batch"] = time.perf_counter() - started
            raise FirstBatch

    ShardImages.batches = first_batch
    recipe = load_recipe("blip-base", [])
    section = getattr(recipe, args.stage)
    cfg = dataclasses.replace(section, num_workers=args.workers, batch_size=args.batch)
    run = stage.filter_shards if args.stage == "filter" else stage.caption_shards
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        try:
            run(inputs / "model", [str(inputs / "photos")], out, cfg)
        except FirstBatch:
            pass
    print(json.dumps(seconds))


def command_run(args: argparse.Namespace, way: str, root: Path) -> list[str]:
    """The ``capfilt STAGE`` command line of one way (the demo recipe's settings)."""
    stage_args = [args.stage, "demo", "--model", str(root / "model")]
    stage_args += ["--shards", str(root / "photos"), "--out", str(root / "out")]
    stage_args += ["--set", f"{args.stage}.num_workers={args.workers}"]
    stage_args += ["--set", f"{args.stage}.batch_size={args.batch}"]
    if way == "now":
        return [sys.executable, "-m", "capfilt", *stage_args]
    return [sys.executable, "-c", BEFORE_COMMAND.format(stage=args.stage), *stage_args]


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    import torch
    from stage_host_cost import make_inputs

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args.image_size = 224
        photos, tiny, n = make_inputs(root, args)
        if args.size == "blip-base":
            print("building a BLIP-base model folder (random weights) ...", flush=True)
            blip_base_model(root / "base")
            (root / "model").rename(root / "tiny")
            (root / "base").rename(root / "model")
        if args.format == "transformers":
            from capfilt.runs.convert import convert

            kind = "filter" if args.stage == "filter" else "captioner"
            convert(root / "model", root / "transformers", to="transformers", kind=kind)
            shutil.rmtree(root / "model")
            (root / "transformers").rename(root / "model")
        runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
        for r in range(args.repeats):
            for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                if args.command:
                    command = command_run(args, way, root)
                else:
                    # run with -c: a fork server imports the main script again, and this one's
                    # imports are not the CLI's (which imports capfilt's modules only when called)
                    command = [sys.executable, "-c", CHILD, *sys.argv[1:], "--child", way]
                    command += ["--inputs", tmp]
                began = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True)
                seconds = time.perf_counter() - began
                if done.returncode:
                    sys.exit(f"the {way} run failed:\n{done.stderr[-3000:]}")
                if args.command:
                    shutil.rmtree(root / "out")
                    runs[way].append({"process": seconds})
                else:
                    runs[way].append(json.loads(done.stdout.strip().splitlines()[-1]))
    if args.command:
        print(
            f"`capfilt {args.stage}`, {args.size} model ({args.format} folder), {args.workers} loader workers, batch "
            f"{args.batch}, {n} photos; {args.repeats} runs per way, alternating; seconds from "
            "the process's start to its exit\n"
            "  now: the fork server started before the command's imports; before: by the loader"
        )
        medians = {way: statistics.median(r["process"] for r in runs[way]) for way in WAYS}
        for way in WAYS:
            best = min(r["process"] for r in runs[way])
            print(f"  {way:<6}: {best:5.2f} s best, {medians[way]:5.2f} s median")
        print(f"  now: {medians['before'] / medians['now']:.2f}x less time (medians)")
        return
    print(
        f"{args.stage} stage, {args.size} model ({args.format} folder), {args.workers} loader workers, batch {args.batch}, "
        f"{n} photos; {args.repeats} runs per way, alternating; seconds from the stage's call\n"
        "  now: no random weights drawn, no training state, weights hashed on a thread and the fork "
        "server started while the model loads; before: random weights drawn, then overwritten, "
        "the training state kept, weights hashed "
        "after the loading, fork server started by the loader"
    )
    medians = {}
    for way in WAYS:
        model = [r["model"] for r in runs[way]]
        first = [r["first batch"] for r in runs[way]]
        medians[way] = statistics.median(first)
        print(
            f"  {way:<6}: first batch after {min(first):5.2f} s best, {medians[way]:5.2f} s median "
            f"(loading and naming the model: {statistics.median(model):5.2f} s median)"
        )
    saved = medians["before"] - medians["now"]
    print(
        f"  now: the first batch {saved:.2f} s sooner, "
        f"{medians['before'] / medians['now']:.2f}x less time to it (medians)"
    )


if __name__ == "__main__":
    main()
