"""``capfilt convert``: BLIP's released checkpoints <-> capfilt model folders.

The source is resolved by :func:`capfilt.runs.resolve.find_model`; the mappings live in
``capfilt.model.convert``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capfilt.config import ConfigError
from capfilt.model.convert.blip_pth import import_blip_state_dict, load_blip_pth
from capfilt.model.convert.keymaps import KINDS
from capfilt.model.convert.transformers_io import import_transformers, write_transformers_folder
from capfilt.model.folder import load_model_folder, save_model_folder
from capfilt.model.tokenizer import load_tokenizer
from capfilt.runs.resolve import find_model, transformers_folder


def convert(
    source: str | Path,
    out: str | Path,
    to: str = "auto",
    kind: str | None = None,
    tokenizer: str | None = None,
    model_config: dict[str, Any] | None = None,
    momentum: bool = True,
) -> tuple[Path, str, str]:
    """``capfilt convert``: returns (out folder, format written, kind).

    - transformers BLIP folder / hub id / BLIP ``.pth`` -> capfilt model folder (``to`` = capfilt);
    - capfilt model or run folder -> transformers folder (``to`` = transformers).
    ``tokenizer``: for a ``.pth`` (default ``bert-base-uncased``, BLIP's) or to replace a
    transformers folder's; ``model_config``: ModelConfig fields for a ``.pth`` (head counts when
    they are not width / 64).
    Raises ValueError (a ConfigError where the source is the problem).
    """
    src = find_model(source)
    if to == "auto":
        to = "transformers" if src.kind == "capfilt" else "capfilt"
    if to not in ("capfilt", "transformers"):
        raise ValueError(f"--to: capfilt or transformers, got '{to}'")
    # only BLIP's .pth holds a whole pretrained model; a transformers checkpoint is one of the two
    kinds = (*KINDS, "pretrain") if src.kind == "file" else KINDS
    if kind is not None and kind not in kinds:
        valid = ", ".join(kinds[:-1]) + f" or {kinds[-1]}"
        raise ConfigError(f"--kind '{kind}': choose {valid}")
    held = sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() else []
    if held or (Path(out).exists() and not Path(out).is_dir()):
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ConfigError(
            f"{out} already holds {shown or 'a file'}: convert writes a whole model folder "
            "(files left from another model would stay beside it); choose a new or empty folder"
        )

    if to == "transformers":
        if src.kind != "capfilt":
            raise ValueError(
                f"{source}: converting to transformers needs a capfilt model or run folder"
            )
        model, tok, cfg, meta = load_model_folder(src.path)
        kind = kind or meta.get("stage")
        if kind not in KINDS:
            raise ValueError(
                f"the model's stage is '{meta.get('stage')}': pass --kind captioner or --kind filter"
            )
        write_transformers_folder(model, tok, cfg, out, kind, preprocess=meta.get("preprocess"))
        return Path(out), "transformers", kind

    if src.kind == "capfilt":
        raise ValueError(f"{source} is already a capfilt model folder (use --to transformers)")
    if src.kind == "file":
        sd = load_blip_pth(src.path)
        tok = load_tokenizer(tokenizer or "bert-base-uncased")
        model, cfg, meta = import_blip_state_dict(
            sd, tok, kind, model_config, momentum, source=src.origin
        )
        keep_momentum = momentum and meta["extra"]["imported"].get("momentum") == "loaded"
    else:
        folder = transformers_folder(src)
        model, tok, cfg, meta = import_transformers(folder, kind, tokenizer, source=src.origin)
        keep_momentum = False
    save_model_folder(
        out,
        model,
        tok,
        cfg,
        stage=meta["stage"],
        extra=meta["extra"],
        include_momentum=keep_momentum,
        preprocess=meta["preprocess"],
    )
    return Path(out), "capfilt", meta["stage"]
