"""What model is at a path: the one place that decides.

A ``--model`` / ``--init`` / ``convert`` source is, in this order:

1. a capfilt model folder (it holds ``folder.CONFIG``);
2. a transformers BLIP folder (a ``config.json`` with ``model_type`` blip);
3. a run folder: its ``model/`` when the run finished, else its latest checkpoint;
4. a file: BLIP's original ``.pth`` (only ``capfilt convert`` reads one);
5. a hub id, only when nothing exists at the path and it reads as ``owner/name`` (no ``./``,
   ``/`` or ``~`` in front, no trailing or second slash, and no leading component that exists
   locally: ``runs/capp`` beside a ``runs/`` folder is a mistyped local path, never a download).

Anything else is a :class:`ConfigError` naming the path, raised before any network access.
``capfilt.model.convert`` only provides the loaders.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch

from capfilt.config import ConfigError
from capfilt.model import load_model_folder, read_meta
from capfilt.model.convert import transformers_io
from capfilt.model.convert.config_map import kind_of_hf_config
from capfilt.model.folder import CONFIG, META, WEIGHTS
from capfilt.runs.run_folder import RunFolder

HF_CONFIG = "config.json"
"""transformers' config file of a checkpoint folder."""

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""``owner/name`` as the hub spells repository ids."""

SourceKind = Literal["capfilt", "transformers", "hub", "file"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points: ``kind`` and ``path`` (the capfilt model folder itself, e.g. a
    run's ``model/`` or checkpoint; a transformers folder; a file (a BLIP ``.pth`` for
    ``convert``); for ``hub``, the id)."""

    kind: SourceKind
    path: Path
    spec: str

    @property
    def origin(self) -> str:
        """What an imported model records as its source: the absolute path of a local one (a
        relative path means nothing once the folder is used elsewhere), a hub id as given."""
        return self.spec if self.kind == "hub" else str(self.path.resolve())


def transformers_model_type(path: str | Path) -> str | None:
    """The ``model_type`` of a folder's transformers ``config.json`` (None: no such file, or not a
    transformers config)."""
    try:
        config = json.loads((Path(path) / HF_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def is_transformers_blip_folder(path: str | Path) -> bool:
    """A folder with a transformers ``config.json`` of ``model_type`` blip (and not a capfilt folder)."""
    path = Path(path)
    return not (path / CONFIG).is_file() and transformers_model_type(path) == "blip"


def is_hub_id(spec: str) -> bool:
    """``spec`` can only mean a hub repository: nothing exists at it, it reads ``owner/name``,
    and its first component is not an existing local folder or file."""
    spec = str(spec)
    if Path(spec).exists() or not HUB_ID.match(spec):
        return False
    if os.altsep and os.altsep != "/" and os.altsep in spec:
        return False
    if os.sep != "/" and os.sep in spec:
        return False
    owner, name = spec.split("/")
    if owner.startswith(".") or name in (".", ".."):
        return False
    return not Path(owner).exists()


def find_model(spec: str | Path) -> ModelSource:
    """What ``spec`` holds, decided locally (no network; see the module doc for the order)."""
    text = str(spec)
    path = Path(spec)
    if path.is_dir():
        if (path / CONFIG).is_file():
            return ModelSource("capfilt", path, text)
        if is_transformers_blip_folder(path):
            return ModelSource("transformers", path, text)
        if (path / "model" / CONFIG).is_file():
            return ModelSource("capfilt", path / "model", text)
        checkpoint = RunFolder(path).latest_checkpoint()
        if checkpoint is not None:
            return ModelSource("capfilt", checkpoint, text)
    elif path.is_file():
        return ModelSource("file", path, text)
    elif is_hub_id(text):
        return ModelSource("hub", path, text)
    other = transformers_model_type(path) if path.is_dir() else None
    if other is not None:  # told apart from an empty folder: the wrong model, not no model
        hint = (
            f"a transformers model of type '{other}', not BLIP: capfilt takes BLIP captioners "
            "and filters (BlipForConditionalGeneration, BlipForImageTextRetrieval)"
        )
    elif path.exists():
        hint = "expected a model folder, or a run folder with model/ or checkpoints/"
    else:
        hint = "no such file or folder, and not a hub id (owner/name)"
    raise ConfigError(f"no capfilt model at {spec} ({hint})")


def transformers_folder(source: ModelSource) -> Path:
    """The local transformers BLIP folder of a ``transformers`` or ``hub`` source (a hub id is
    fetched here, and only here)."""
    if source.kind == "transformers":
        return source.path
    if source.kind != "hub":
        raise ConfigError(f"{source.spec}: not a transformers BLIP checkpoint")
    try:
        folder = transformers_io.fetch_hub_checkpoint(source.spec)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not is_transformers_blip_folder(folder):
        raise ConfigError(
            f"{source.spec}: not a transformers BLIP checkpoint (no {HF_CONFIG} with model_type 'blip')"
        )
    return folder


_NOT_CAPFILT = {
    "transformers": "a transformers BLIP folder: convert it first with capfilt convert",
    "file": "a file, not a model folder: convert a BLIP .pth first with capfilt convert",
    "hub": "no such file or folder",
}


def _capfilt_folder(source: ModelSource) -> Path:
    if source.kind != "capfilt":
        raise ConfigError(f"no capfilt model at {source.spec} ({_NOT_CAPFILT[source.kind]})")
    return source.path


def training_recipe_name(spec: str | Path) -> str | None:
    """The name of the recipe the capfilt model at ``spec`` was trained with: its run folder's
    (the folder holding it as ``model/`` or ``checkpoints/<step>``). None when unknown: no such
    model, a transformers BLIP model, or a model folder kept apart from its run."""
    try:
        source = find_model(spec)
    except ConfigError:
        return None
    if source.kind != "capfilt":
        return None
    for run in (source.path.parent, source.path.parent.parent):
        name = RunFolder(run).recipe_name()
        if name is not None:
            return name
    return None


def resolve_model_dir(path: str | Path) -> Path:
    """The capfilt model folder at ``path``: itself, or a run folder's ``model/`` (finished run)
    or latest checkpoint."""
    return _capfilt_folder(find_model(path))


def _stage_folder(source: ModelSource) -> Path:
    """The folder a stage loads ``source`` from: a transformers one (fetched for a hub id) or a
    capfilt one."""
    if source.kind in ("transformers", "hub"):
        return transformers_folder(source)
    return _capfilt_folder(source)


def _load_stage_folder(source: ModelSource, folder: Path, device: torch.device):
    if source.kind in ("transformers", "hub"):
        try:
            model, tokenizer, cfg, meta = transformers_io.import_transformers(
                folder, source=source.origin
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        model.drop_training_state()
        return model.to(device).eval(), tokenizer, cfg, meta, folder
    model, tokenizer, cfg, meta = load_model_folder(folder, device=device, inference=True)
    return model, tokenizer, cfg, meta, folder


def load_stage_model(path: str | Path, device: torch.device):
    """(model, tokenizer, model_cfg, meta, folder) from a model folder, a run folder, or a
    transformers BLIP captioner/filter (folder, or hub id when online; converted on the fly).
    The model is for inference, in eval mode and without its training state (momentum copies and
    queues: :meth:`~capfilt.model.med.MED.drop_training_state`)."""
    source = find_model(path)
    return _load_stage_folder(source, _stage_folder(source), device)


def load_identified_model(path: str | Path, device: torch.device):
    """:func:`load_stage_model`'s (model, tokenizer, model_cfg, meta, folder) and the model's id,
    ``"<stage>-<fingerprint>"`` (:func:`model_fingerprint`), that a stage records with its output.

    The weights are hashed on a thread while they load (hashlib lets go of the GIL while it
    hashes): a BLIP-base folder's 1.8 GB take 1.5 s to hash on this project's CPU machine, time
    a stage no longer spends between loading its model and starting its work."""
    source = find_model(path)
    folder = _stage_folder(source)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="capfilt-fingerprint") as pool:
        fingerprint = pool.submit(model_fingerprint, folder)
        model, tokenizer, cfg, meta, folder = _load_stage_folder(source, folder, device)
        model_id = f"{meta.get('stage', 'model')}-{fingerprint.result()}"
    return model, tokenizer, cfg, meta, folder, model_id


def model_fingerprint(folder: Path) -> str:
    """Short identity of a model folder (weights + config), recorded with what it produced. The
    metadata's ``extra`` (the run folder's path, the step count) is left out: the same weights
    keep their id wherever they were trained or moved, so a moved model folder does not re-run
    the shards a stage already made with it."""
    digest = hashlib.sha256()
    for name in (CONFIG, META, HF_CONFIG):
        path = folder / name
        if not path.is_file():
            continue
        if name == META:
            meta = json.loads(path.read_text())
            meta.pop("extra", None)
            digest.update(json.dumps(meta, sort_keys=True).encode())
        else:
            digest.update(path.read_bytes())
    weights = folder / WEIGHTS  # transformers' safetensors weights file has the same name
    if weights.is_file():
        with open(weights, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:12]


RETRIEVAL_MODEL = "a retrieval (ITM) model, e.g. Salesforce/blip-itm-base-coco"
STAGE_HEADS = {
    "itm": ("itm_head", "the ITM head", RETRIEVAL_MODEL),
    "itc": ("vision_proj", "the ITC projections", RETRIEVAL_MODEL),
    "lm": (
        "text_decoder.cls",
        "the LM head",
        "a captioner, e.g. Salesforce/blip-image-captioning-base",
    ),
}
"""The heads a use of the model reads: (parameter prefix, its name, a checkpoint that holds it)."""


def check_heads_trained(meta: dict, folder: str | Path, heads: tuple[str, ...], use: str) -> None:
    """ConfigError when a head that ``use`` needs (:data:`STAGE_HEADS` keys) was not in the
    checkpoint the model was imported from: a transformers captioner holds no ITM head and a
    retrieval model no LM head, so the import fills them with a fresh initialisation, and scores
    or captions from them would be noise that looks like output (``extra.imported.initialised``)."""
    imported = (meta.get("extra") or {}).get("imported") or {}
    fresh = imported.get("initialised") or []
    missing = [
        STAGE_HEADS[key]
        for key in heads
        if any(p == STAGE_HEADS[key][0] or p.startswith(STAGE_HEADS[key][0] + ".") for p in fresh)
    ]
    if not missing:
        return
    names = " and ".join(name for _, name, _ in missing)
    were, hold = ("was", "it holds") if len(missing) == 1 else ("were", "they hold")
    raise ConfigError(
        f"{folder}: {names} of this {meta.get('stage', 'model')} {were} not in the checkpoint it was "
        f"imported from ({imported.get('source') or folder}): {hold} a fresh initialisation, "
        f"so {use} would be noise; {use} needs {missing[0][2]}"
    )


IMPORT_LACKS = {"captioner": ("itm", "itc"), "filter": ("lm",)}
"""The :data:`STAGE_HEADS` a transformers BLIP checkpoint of each kind does not hold, which its
import initialises afresh (``keymaps.hf_key_to_med``: a captioner brings the decoder, a
filter the encoder and its heads)."""


def peek_stage_model(spec: str | Path) -> tuple[dict, Path]:
    """(meta, folder) that a stage would load ``spec`` with, read without its weights: a capfilt
    folder's meta; for a transformers folder or a hub id (fetched here, as the stage would) the
    kind its ``config.json`` names and the heads its import would initialise, as the import's
    meta records them (``extra.imported.initialised``), so that :func:`check_heads_trained`
    and :func:`made_for` judge it before any stage runs."""
    source = find_model(spec)
    folder = _stage_folder(source)
    try:
        if source.kind == "capfilt":
            return read_meta(folder), folder
        config = json.loads((folder / HF_CONFIG).read_text())
        kind = kind_of_hf_config(SimpleNamespace(architectures=config.get("architectures")), None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{spec}: {exc}") from None
    fresh = [STAGE_HEADS[head][0] for head in IMPORT_LACKS[kind]]
    imported = {"source": source.origin, "initialised": fresh}
    return {"stage": kind, "extra": {"imported": imported}}, folder


STAGE_MAKERS = {"captioning": ("captioner", "lm"), "filtering": ("filter", "itm")}
"""What each use takes: the stage whose models are made for it (a pretrain serves too), and the
head (:data:`STAGE_HEADS`) that stage fine-tunes."""


def made_for(meta: dict, use: str) -> str | None:
    """Why the model of ``meta`` is a poor one for ``use`` (``captioning``/``filtering``), or None.
    A model fine-tuned for the other half has that head as the pretrain left it (BLIP fine-tunes
    the captioner with LM alone and the filter with ITC + ITM): it runs, so it is not refused,
    but its output is not a fine-tuned model's."""
    wanted, head = STAGE_MAKERS[use]
    stage = meta.get("stage")
    if stage in (wanted, "pretrain"):
        return None
    _, name, example = STAGE_HEADS[head]
    return (
        f"made by stage '{stage}', not a {wanted}: {name} was not fine-tuned for {use}; "
        f"give a {wanted} (a capfilt finetune {wanted} run, or {example})"
    )
