"""BLIP's released checkpoints in capfilt: import from / export to transformers' BLIP format and
import BLIP's original ``.pth`` state dicts (issue 6).

Two transformers classes hold the two CapFilt models:

- ``BlipForConditionalGeneration`` (a *captioner*): ``vision_model`` + ``text_decoder``;
- ``BlipForImageTextRetrieval`` (a *filter*): ``vision_model`` + ``text_encoder`` + ``vision_proj``
  + ``text_proj`` + ``itm_head``.

Mapping onto capfilt's :class:`~capfilt.model.med.MED`:

- **Vision.** transformers' ``BlipVisionModel`` and timm's ViT are the same network under other
  names (pre-norm blocks, fused ``qkv`` with the same [3, heads, head_dim] layout, [CLS] first, exact
  GELU); ``post_layernorm`` on ``last_hidden_state`` is timm's final ``norm``
  (:data:`VISION_KEYS`). BLIP trained its ViT with LayerNorm eps 1e-6 (capfilt's ViT default);
  transformers' BLIP configs say ``layer_norm_eps`` = 1e-5. The import keeps the checkpoint's eps
  (recorded in ``capfilt.json`` ``extra.vision_layer_norm_eps`` and re-applied on load) so that
  outputs equal transformers'; the export writes the eps the model runs with.
- **Text.** Both sides are transformers' ``BlipText*`` classes, so keys are equal up to the prefix.
  capfilt's encoder and decoder share everything but self-attention; a captioner checkpoint has
  only the decoder and a retrieval checkpoint only the encoder. The missing side takes the shared
  weights (the same tensors) and, for its self-attention, a copy of the present side's
  self-attention (encoder SA := decoder SA for a captioner, decoder SA := encoder SA for a filter).
  Heads the checkpoint lacks (a captioner's ``vision_proj``/``text_proj``/``itm_head``, a filter's
  LM-head transform and bias) keep a seeded initialisation and are listed in
  ``capfilt.json`` ``extra.imported.initialised``: they are never used by that stage.
- **Tokens.** BLIP's tokenizer is bert-base-uncased plus ``[DEC]`` (bos, 30522) and ``[ENC]``
  (30523). transformers' ``BlipForConditionalGeneration.generate`` puts ``bos_token_id`` first
  and stops at ``sep_token_id``, as capfilt does. ``BlipForImageTextRetrieval`` passes the ids as
  given ([CLS] first) to the ITM head, while BLIP trained and evaluated ITM with ``[ENC]`` first;
  capfilt always puts ``[ENC]`` first (feed transformers ``ids[:, 0] = [ENC]`` for equal scores).
- **Preprocessing.** Images: bicubic resize to ``image_size`` and CLIP mean/std (capfilt's
  ``EvalTransform``, as ``BlipImageProcessor``). Caption prompt: ``"a picture of "`` (capfilt's
  caption default, BLIP's).

Original BLIP ``.pth`` files already use capfilt's names (``visual_encoder.*`` in timm layout,
``text_encoder.*``, ``text_decoder.*``, ``*_m``, queues); only ``ptr_queue`` is renamed, the
momentum text encoder's cross-attention (unused by ITC) and BLIP's image-id queue are dropped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capfilt.config.schema import ModelConfig
from capfilt.model.med import MAX_POSITIONS, MED
from capfilt.model.tokenizer import special_ids

KINDS = ("captioner", "filter")
"""What a transformers BLIP checkpoint holds: a captioner (LM) or a filter (ITC + ITM)."""
ARCHITECTURES = {"captioner": "BlipForConditionalGeneration", "filter": "BlipForImageTextRetrieval"}
BLIP_PROMPT = "a picture of "
"""BLIP's caption prompt (capfilt's ``caption.prompt`` default)."""
CAPFILT_VIT_EPS = 1e-6
"""LayerNorm eps of capfilt's (and BLIP's) ViT."""
TEXT_LEN = {"captioner": 40, "filter": 35, "pretrain": 35}
"""``max_text_len`` given to imported models (BLIP: 35 tokens for ITM, 40 for captioning)."""
EXTRA_EPS = "vision_layer_norm_eps"
"""``capfilt.json`` ``extra`` key of an imported model's ViT LayerNorm eps."""
INIT_SEED = 0
"""Seed of the initialisation of the parts a checkpoint lacks (conversion is deterministic)."""

# timm ViT name <-> transformers BlipVisionModel name; {i} = block index, {p} = weight | bias
VISION_KEYS = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
)

MOMENTUM_MODULES = ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.")
QUEUES = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
HEADS = ("vision_proj.", "text_proj.", "itm_head.")


def _pattern(template: str) -> re.Pattern:
    body = (
        re.escape(template)
        .replace(r"\{i\}", r"(?P<i>\d+)")
        .replace(r"\{p\}", r"(?P<p>weight|bias)")
    )
    return re.compile(body + r"\Z")


_TIMM_TO_HF = [(_pattern(t), h) for t, h in VISION_KEYS]
_HF_TO_TIMM = [(_pattern(h), t) for t, h in VISION_KEYS]


def _rename(name: str, rules) -> str | None:
    for pattern, template in rules:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def timm_to_hf_vision_key(name: str) -> str | None:
    """``blocks.3.attn.proj.weight`` -> ``encoder.layers.3.self_attn.projection.weight`` (None: no match)."""
    return _rename(name, _TIMM_TO_HF)


def hf_to_timm_vision_key(name: str) -> str | None:
    return _rename(name, _HF_TO_TIMM)


def med_key_to_hf(key: str, kind: str) -> str | None:
    """The transformers key holding MED parameter ``key`` in a ``kind`` checkpoint (None: not held)."""
    if key.startswith("visual_encoder."):
        name = timm_to_hf_vision_key(key[len("visual_encoder.") :])
        return None if name is None else "vision_model." + name
    if kind == "captioner" and key.startswith("text_decoder."):
        return key
    if kind == "filter" and key.startswith(("text_encoder.", *HEADS)):
        return key
    return None


def hf_key_to_med(key: str, kind: str) -> str | None:
    """The MED parameter a transformers key of a ``kind`` checkpoint goes to (None: unknown)."""
    if key.startswith("vision_model."):
        name = hf_to_timm_vision_key(key[len("vision_model.") :])
        return None if name is None else "visual_encoder." + name
    if kind == "captioner" and key.startswith("text_decoder."):
        return key
    if kind == "filter" and key.startswith(("text_encoder.", *HEADS)):
        return key
    return None


def _partner(key: str) -> str | None:
    """The same text weight on the other side (encoder <-> decoder)."""
    if key.startswith("text_encoder."):
        return "text_decoder.bert." + key[len("text_encoder.") :]
    if key.startswith("text_decoder.bert."):
        return "text_encoder." + key[len("text_decoder.bert.") :]
    return None


# ---------------------------------------------------------------------------------- configs
def _square(value, what: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(f"{what}: capfilt's ViT needs a square {what}, got {value}")
        value = value[0]
    return int(value)


def model_config_from_hf(config, kind: str) -> tuple[ModelConfig, float]:
    """(ModelConfig, vision LayerNorm eps) of a transformers ``BlipConfig``; refuses what capfilt
    cannot run identically (non-GELU activations, a text position table other than 512, ...)."""
    vc, tc = config.vision_config, config.text_config
    problems = []
    if vc.hidden_act != "gelu" or tc.hidden_act != "gelu":
        problems.append(f"activations {vc.hidden_act}/{tc.hidden_act} (capfilt: exact gelu)")
    if vc.intermediate_size != 4 * vc.hidden_size:
        problems.append(f"vision intermediate_size {vc.intermediate_size} != 4 x hidden_size")
    if tc.max_position_embeddings != MAX_POSITIONS:
        problems.append(
            f"text max_position_embeddings {tc.max_position_embeddings} (capfilt: {MAX_POSITIONS})"
        )
    if abs(tc.layer_norm_eps - 1e-12) > 1e-15:
        problems.append(f"text layer_norm_eps {tc.layer_norm_eps} (capfilt: 1e-12)")
    if getattr(tc, "encoder_hidden_size", vc.hidden_size) != vc.hidden_size:
        problems.append("text encoder_hidden_size differs from the vision width")
    if not getattr(tc, "is_decoder", True):
        problems.append("text_config.is_decoder is false: the text stack has no cross-attention")
    if problems:
        raise ValueError("transformers BLIP config not supported: " + "; ".join(problems))
    cfg = ModelConfig(
        image_size=_square(vc.image_size, "image_size"),
        patch_size=_square(vc.patch_size, "patch_size"),
        vision_width=vc.hidden_size,
        vision_depth=vc.num_hidden_layers,
        vision_heads=vc.num_attention_heads,
        text_width=tc.hidden_size,
        text_layers=tc.num_hidden_layers,
        text_heads=tc.num_attention_heads,
        text_intermediate=tc.intermediate_size,
        vocab_size=tc.vocab_size,
        max_text_len=TEXT_LEN[kind],
        embed_dim=config.image_text_hidden_size,
    )
    cfg.validate()
    return cfg, float(vc.layer_norm_eps)


def hf_config_from_model(model: MED, cfg: ModelConfig, kind: str, eps: float | None = None):
    """The transformers ``BlipConfig`` of a MED exported as ``kind``."""
    from transformers import BlipConfig

    if cfg.image_pool != "cls":
        raise ValueError(
            f"model.image_pool '{cfg.image_pool}': transformers' BLIP takes the ITC image feature from the [CLS] "
            "token, so this model's ITC scores would change on export; export a model trained with image_pool: cls"
        )

    sp = model.special
    text = dict(
        vocab_size=model.vocab_size,
        hidden_size=cfg.text_width,
        encoder_hidden_size=cfg.vision_width,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=MAX_POSITIONS,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        bos_token_id=sp["dec"],
        eos_token_id=sp["sep"],
        sep_token_id=sp["sep"],
        pad_token_id=sp["pad"],
        is_decoder=True,
        use_cache=True,
        tie_word_embeddings=True,
    )
    vision = dict(
        hidden_size=cfg.vision_width,
        intermediate_size=4 * cfg.vision_width,
        num_hidden_layers=cfg.vision_depth,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu",
        layer_norm_eps=vision_layer_norm_eps(model) if eps is None else eps,
        initializer_range=0.02,
    )
    return BlipConfig(
        text_config=text,
        vision_config=vision,
        image_text_hidden_size=cfg.embed_dim,
        architectures=[ARCHITECTURES[kind]],
    )


# ---------------------------------------------------------------------------------- eps
def vision_layer_norm_eps(model: MED) -> float:
    for module in model.visual_encoder.modules():
        if isinstance(module, nn.LayerNorm):
            return float(module.eps)
    return CAPFILT_VIT_EPS


def set_vision_layer_norm_eps(model: MED, eps: float) -> None:
    """Set the eps of every LayerNorm of the ViT and its momentum copy."""
    for vit in (model.visual_encoder, model.visual_encoder_m):
        for module in vit.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(eps)


def apply_folder_settings(model: MED, meta: dict[str, Any]) -> None:
    """Settings a model folder keeps in ``capfilt.json`` beyond ModelConfig (an imported
    checkpoint's ViT LayerNorm eps); called by ``load_model_folder``."""
    eps = (meta.get("extra") or {}).get(EXTRA_EPS)
    if eps is not None:
        set_vision_layer_norm_eps(model, float(eps))


# ---------------------------------------------------------------------------------- import
def _new_med(cfg: ModelConfig, tokenizer, vocab_size: int) -> MED:
    """A MED with a seeded initialisation (so a conversion always writes the same bytes)."""
    ids = special_ids(tokenizer)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens (with [DEC]/[ENC]) but the checkpoint's vocabulary only {vocab_size}"
        )
    if len(tokenizer) < vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens (with [DEC]/[ENC]) but the checkpoint's vocabulary {vocab_size}: "
            "is it the checkpoint's tokenizer?"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = MED(cfg, vocab_size=vocab_size, special=ids)
    return model


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


@torch.no_grad()
def fill_med(model: MED, values: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Write MED-named tensors into ``model``; fill the absent text side from the present one.

    Returns ``{"filled": [...], "initialised": [...], "momentum": [...]}``: parameters copied
    from the other text side's self-attention, parameters the source lacks (kept at their seeded
    initialisation), and whether the momentum state came from the source.
    Raises ValueError on unknown names or shape mismatches.
    """
    sd = model.state_dict()
    unknown = sorted(k for k in values if k not in sd)
    if unknown:
        raise ValueError(f"unknown weights for this model: {unknown[:8]}")
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(sd[k].shape)}"
        for k, v in values.items()
        if tuple(v.shape) != tuple(sd[k].shape)
    ]
    if bad:
        raise ValueError(f"weights do not fit the model config: {bad[:6]}")

    plan: dict[str, torch.Tensor] = {}
    filled = []
    for key in sd:
        if key in values:
            continue
        partner = _partner(key)
        if partner is not None and partner in values:
            plan[key] = values[partner]
            if (
                ".attention." in key
            ):  # self-attention: a copy; shared parts are the same tensor anyway
                filled.append(key)
    plan.update(values)  # the source's own tensors last: they win over any fill of a shared tensor
    written = set()
    for key, value in plan.items():
        sd[key].copy_(value.to(sd[key].dtype))
        written.add(_storage_key(sd[key]))

    online = {k: v for k, v in sd.items() if not k.startswith(MOMENTUM_MODULES) and k not in QUEUES}
    initialised = sorted(k for k, v in online.items() if _storage_key(v) not in written)

    momentum_keys = [k for k in sd if k.startswith(MOMENTUM_MODULES)]
    has_momentum = bool(momentum_keys) and all(k in values for k in momentum_keys)
    if not has_momentum:
        model.copy_params()
    if not ("image_queue" in values and "text_queue" in values):
        model.queue_ptr.zero_()
    model.idx_queue.fill_(-1)  # image ids of someone else's data set mean nothing here
    return {
        "filled": filled,
        "initialised": initialised,
        "momentum": ["loaded" if has_momentum else "copied from online"],
    }


def _summarise(keys: list[str]) -> list[str]:
    """Module-level summary of parameter names (``text_decoder.cls.predictions.bias`` ->
    ``text_decoder.cls.predictions``; layer indices collapsed)."""
    out = []
    for key in keys:
        name = re.sub(r"\.\d+\.", ".*.", key.rsplit(".", 1)[0])
        if name not in out:
            out.append(name)
    return out


def kind_of_hf_config(config, kind: str | None) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    found = [k for k, a in ARCHITECTURES.items() if a in archs]
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(
                f"kind: choose captioner or filter for a transformers checkpoint, got '{kind}'"
            )
        if found and found[0] != kind:
            raise ValueError(f"the checkpoint is a {archs[0]} ({found[0]}), not a {kind}")
        return kind
    if not found:
        raise ValueError(
            f"architectures {archs or 'not set'}: capfilt imports BlipForConditionalGeneration (captioner) and "
            "BlipForImageTextRetrieval (filter); pass kind to choose"
        )
    return found[0]


def med_from_hf_model(
    hf_model, tokenizer, kind: str | None = None, source: str = ""
) -> tuple[MED, ModelConfig, dict[str, Any]]:
    """MED from an in-memory transformers BLIP captioner or retrieval model.

    Returns (model in eval mode, ModelConfig, meta) where ``meta`` is laid out like ``capfilt.json``
    (``stage``, ``extra.imported``, ``extra.vision_layer_norm_eps``).
    """
    kind = kind_of_hf_config(hf_model.config, kind)
    cfg, eps = model_config_from_hf(hf_model.config, kind)
    tc = hf_model.config.text_config
    ids = special_ids(tokenizer)
    expected = {"dec": tc.bos_token_id, "pad": tc.pad_token_id, "sep": tc.sep_token_id}
    wrong = {k: (ids[k], v) for k, v in expected.items() if v is not None and ids[k] != v}
    if wrong:
        raise ValueError(
            "tokenizer and checkpoint disagree on special ids (tokenizer, config): "
            + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in wrong.items())
        )
    model = _new_med(cfg, tokenizer, tc.vocab_size)
    values, unknown = {}, []
    for key, tensor in hf_model.state_dict().items():
        target = hf_key_to_med(key, kind)
        if target is None:
            unknown.append(key)
        else:
            values[target] = tensor
    if unknown:
        raise ValueError(f"transformers weights with no place in capfilt's MED: {unknown[:8]}")
    report = fill_med(model, values)
    set_vision_layer_norm_eps(model, eps)
    model.eval()
    meta = _meta(
        kind,
        cfg,
        tokenizer,
        model,
        eps,
        {
            "format": "transformers",
            "architecture": ARCHITECTURES[kind],
            "source": source,
            "self_attention_filled_from": "decoder" if kind == "captioner" else "encoder",
            "filled": _summarise(report["filled"]),
            "initialised": _summarise(report["initialised"]),
        },
    )
    return model, cfg, meta


def _meta(
    kind: str, cfg: ModelConfig, tokenizer, model: MED, eps: float, imported: dict
) -> dict[str, Any]:
    from capfilt.model.folder import FORMAT_VERSION

    return {
        "format_version": FORMAT_VERSION,
        "stage": kind,
        "vocab_size": model.vocab_size,
        "special_ids": special_ids(tokenizer),
        "extra": {"imported": imported, EXTRA_EPS: eps, "caption_prompt": BLIP_PROMPT},
    }


# ---------------------------------------------------------------------------------- sources
def is_transformers_blip_folder(path: str | Path) -> bool:
    """A folder with a transformers ``config.json`` of ``model_type`` blip (and not a capfilt folder)."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file() or (path / "model_config.json").is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "blip"
    except (OSError, ValueError):
        return False


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(spec: str) -> bool:
    return not Path(spec).exists() and bool(HUB_ID.match(str(spec)))


def fetch_hub_checkpoint(repo_id: str) -> Path:
    """Local snapshot of a hub checkpoint (config, tokenizer, processor, safetensors weights)."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.bin"]))
    except Exception as exc:  # offline, unknown id, gated
        raise ValueError(
            f"'{repo_id}': not a local path, and not reachable as a hub id ({type(exc).__name__}: {exc})"
        ) from exc
    return path


def load_hf_blip(path: str | Path, kind: str | None = None, tokenizer: str | None = None):
    """Load a transformers BLIP captioner/filter folder (or hub id) as transformers itself does;
    returns (hf_model, tokenizer, kind, folder)."""
    from transformers import AutoConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.model.tokenizer import load_tokenizer

    folder = Path(path)
    if not folder.exists():
        if not looks_like_hub_id(str(path)):
            raise ValueError(f"{path}: no such file or folder")
        folder = fetch_hub_checkpoint(str(path))
    if not is_transformers_blip_folder(folder):
        raise ValueError(
            f"{folder}: not a transformers BLIP checkpoint (no config.json with model_type 'blip')"
        )
    config = AutoConfig.from_pretrained(str(folder))
    kind = kind_of_hf_config(config, kind)
    cls = BlipForConditionalGeneration if kind == "captioner" else BlipForImageTextRetrieval
    hf_model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise ValueError(
            f"{folder}: the checkpoint lacks weights of {cls.__name__}: {sorted(missing)[:8]}"
        )
    tok_source = tokenizer or str(folder)
    try:
        tok = load_tokenizer(tok_source)
    except ValueError as exc:
        raise ValueError(
            f"{exc} (pass the checkpoint's tokenizer explicitly: --tokenizer)"
        ) from exc
    return hf_model.eval(), tok, kind, folder


def import_transformers(path: str | Path, kind: str | None = None, tokenizer: str | None = None):
    """(MED, tokenizer, ModelConfig, meta, folder) from a transformers BLIP folder or hub id."""
    hf_model, tok, kind, folder = load_hf_blip(path, kind, tokenizer)
    model, cfg, meta = med_from_hf_model(hf_model, tok, kind, source=str(path))
    return model, tok, cfg, meta, folder


# ---------------------------------------------------------------------------------- BLIP .pth
def _count(prefix: str, keys, pattern: str) -> int:
    rx = re.compile(re.escape(prefix) + pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def model_config_from_blip_state_dict(
    sd: dict[str, torch.Tensor], kind: str, overrides: dict[str, Any] | None = None
) -> ModelConfig:
    """Dimensions read off the tensors; head counts are width / 64 (BLIP's ViT-B/L and BERT-base)
    unless ``overrides`` says otherwise (any ModelConfig field)."""
    keys = list(sd)
    try:
        vision_width = sd["visual_encoder.cls_token"].shape[-1]
        patch = sd["visual_encoder.patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(sd["visual_encoder.pos_embed"].shape[1] - 1)
        side = (
            "text_encoder."
            if "text_encoder.embeddings.word_embeddings.weight" in sd
            else "text_decoder.bert."
        )
        words = sd[side + "embeddings.word_embeddings.weight"]
        intermediate = sd[side + "encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"not a BLIP state dict: no {exc}") from None
    text_width = words.shape[1]
    embed_dim = sd["vision_proj.weight"].shape[0] if "vision_proj.weight" in sd else 256
    fields: dict[str, Any] = dict(
        image_size=grid * patch,
        patch_size=patch,
        vision_width=vision_width,
        vision_depth=_count("visual_encoder.", keys, r"blocks\.(\d+)\."),
        vision_heads=max(1, vision_width // 64),
        text_width=text_width,
        text_layers=_count(side, keys, r"encoder\.layer\.(\d+)\."),
        text_heads=max(1, text_width // 64),
        text_intermediate=intermediate,
        vocab_size=words.shape[0],
        max_text_len=TEXT_LEN[kind],
        embed_dim=embed_dim,
    )
    if "image_queue" in sd:
        fields["queue_size"] = sd["image_queue"].shape[1]
    if "temp" in sd:
        fields["temp"] = float(sd["temp"])
    for key, value in (overrides or {}).items():
        if key not in ModelConfig.__dataclass_fields__:
            raise ValueError(f"model config: unknown field '{key}'")
        fields[key] = value
    cfg = replace(ModelConfig(), **fields)
    cfg.validate()
    return cfg


def kind_of_blip_state_dict(sd: dict[str, torch.Tensor], kind: str | None) -> str:
    has_dec = any(k.startswith("text_decoder.") for k in sd)
    has_enc = any(k.startswith("text_encoder.") for k in sd)
    auto = (
        "pretrain"
        if has_dec and has_enc
        else "captioner"
        if has_dec
        else "filter"
        if has_enc
        else None
    )
    if auto is None:
        raise ValueError("not a BLIP state dict: no text_encoder.* or text_decoder.* weights")
    if kind is None:
        return auto
    if kind not in (*KINDS, "pretrain"):
        raise ValueError(f"kind: choose captioner, filter or pretrain, got '{kind}'")
    if (
        (kind == "captioner" and not has_dec)
        or (kind == "filter" and not has_enc)
        or (kind == "pretrain" and auto != "pretrain")
    ):
        raise ValueError(
            f"the state dict holds a {auto} (text_encoder: {has_enc}, text_decoder: {has_dec}), not a {kind}"
        )
    return kind


def blip_state_dict_to_med(
    sd: dict[str, torch.Tensor], kind: str, momentum: bool = True
) -> dict[str, torch.Tensor]:
    """BLIP's original names -> MED names, keeping what ``kind`` uses."""
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids") or key == "idx_queue" or ".pooler." in key:
            continue
        if key == "ptr_queue":
            key = "queue_ptr"
        if key.startswith("text_encoder_m.") and ".crossattention." in key:
            continue  # BLIP's momentum text encoder has unused cross-attention; capfilt's has none
        if key.startswith(MOMENTUM_MODULES) or key in QUEUES:
            if not momentum:
                continue
        elif kind == "captioner" and key.startswith(("text_encoder.", *HEADS)):
            continue
        elif kind == "filter" and key.startswith("text_decoder."):
            continue
        out[key] = value
    if "queue_ptr" in out:
        out["queue_ptr"] = out["queue_ptr"].reshape(1).long()
    return out


def import_blip_state_dict(
    sd: dict[str, torch.Tensor],
    tokenizer,
    kind: str | None = None,
    model_config: dict[str, Any] | ModelConfig | None = None,
    momentum: bool = True,
    source: str = "",
) -> tuple[MED, ModelConfig, dict[str, Any]]:
    """MED from a state dict in BLIP's original layout (``visual_encoder.*``, ``text_encoder.*``,
    ``text_decoder.*``, optionally ``*_m`` and queues). ``model_config``: a ModelConfig, or
    ModelConfig fields overriding those read off the tensors (head counts, chiefly)."""
    kind = kind_of_blip_state_dict(sd, kind)
    if isinstance(model_config, ModelConfig):
        cfg = model_config
    else:
        cfg = model_config_from_blip_state_dict(sd, kind, model_config)
    values = blip_state_dict_to_med(sd, kind, momentum)
    model = _new_med(
        cfg,
        tokenizer,
        values[next(k for k in values if k.endswith("word_embeddings.weight"))].shape[0],
    )
    report = fill_med(model, values)
    set_vision_layer_norm_eps(model, CAPFILT_VIT_EPS)
    model.eval()
    meta = _meta(
        kind,
        cfg,
        tokenizer,
        model,
        CAPFILT_VIT_EPS,
        {
            "format": "blip-pth",
            "source": source,
            "self_attention_filled_from": {"captioner": "decoder", "filter": "encoder"}.get(kind),
            "filled": _summarise(report["filled"]),
            "initialised": _summarise(report["initialised"]),
            "momentum": report["momentum"][0],
        },
    )
    return model, cfg, meta


def load_blip_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an original BLIP checkpoint (``torch.load(weights_only=True)``; ``{"model": ...}`` unwrapped)."""
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------- export
@torch.no_grad()
def med_to_hf(model: MED, cfg: ModelConfig, kind: str, eps: float | None = None):
    """A transformers ``BlipForConditionalGeneration`` (captioner) or ``BlipForImageTextRetrieval``
    (filter) with the MED's weights (eval mode)."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    if kind not in KINDS:
        raise ValueError(f"kind: choose captioner or filter, got '{kind}'")
    config = hf_config_from_model(model, cfg, kind, eps)
    cls = BlipForConditionalGeneration if kind == "captioner" else BlipForImageTextRetrieval
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        hf_model = cls(config)
    med_sd = model.state_dict()
    hf_sd = hf_model.state_dict()
    missing = []
    for key, tensor in hf_sd.items():
        source = hf_key_to_med(key, kind)
        if source is None or source not in med_sd:
            missing.append(key)
            continue
        tensor.copy_(med_sd[source].to(tensor.dtype))
    if missing:
        raise ValueError(f"no capfilt weights for transformers keys {missing[:8]}")
    return hf_model.eval()


def write_transformers_folder(
    model: MED, tokenizer, cfg: ModelConfig, out: str | Path, kind: str, eps: float | None = None
) -> Path:
    """Save a MED as a transformers BLIP checkpoint folder: weights + config, tokenizer, and a
    ``BlipProcessor`` (image size, CLIP mean/std, bicubic)."""
    from transformers import BlipImageProcessor, BlipProcessor

    from capfilt.data.transforms import CLIP_MEAN, CLIP_STD

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_model = med_to_hf(model, cfg, kind, eps)
    hf_model.save_pretrained(str(out))
    image_processor = BlipImageProcessor(
        size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    try:
        BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
            str(out)
        )
    except Exception:  # a tokenizer class the processor refuses: save the parts on their own
        image_processor.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------------------- entry points
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
    """
    from capfilt.model.folder import load_model_folder, save_model_folder
    from capfilt.model.tokenizer import load_tokenizer
    from capfilt.train.run_folder import resolve_model_dir

    src = Path(source)
    is_capfilt = (
        src.is_dir()
        and not is_transformers_blip_folder(src)
        and (
            (src / "model_config.json").is_file()
            or (src / "model" / "model_config.json").is_file()
            or (src / "checkpoints").is_dir()
        )
    )
    if to == "auto":
        to = "transformers" if is_capfilt else "capfilt"
    if to not in ("capfilt", "transformers"):
        raise ValueError(f"--to: capfilt or transformers, got '{to}'")

    if to == "transformers":
        if not is_capfilt:
            raise ValueError(
                f"{source}: converting to transformers needs a capfilt model or run folder"
            )
        model, tok, cfg, meta = load_model_folder(resolve_model_dir(src))
        kind = kind or meta.get("stage")
        if kind not in KINDS:
            raise ValueError(
                f"the model's stage is '{meta.get('stage')}': pass --kind captioner or --kind filter"
            )
        write_transformers_folder(model, tok, cfg, out, kind)
        return Path(out), "transformers", kind

    if is_capfilt:
        raise ValueError(f"{source} is already a capfilt model folder (use --to transformers)")
    if src.is_file():
        sd = load_blip_pth(src)
        tok = load_tokenizer(tokenizer or "bert-base-uncased")
        model, cfg, meta = import_blip_state_dict(
            sd, tok, kind, model_config, momentum, source=str(source)
        )
        keep_momentum = momentum and meta["extra"]["imported"].get("momentum") == "loaded"
    else:
        model, tok, cfg, meta, _ = import_transformers(source, kind, tokenizer)
        keep_momentum = False
    save_model_folder(
        out,
        model,
        tok,
        cfg,
        stage=meta["stage"],
        extra=meta["extra"],
        include_momentum=keep_momentum,
    )
    return Path(out), "capfilt", meta["stage"]
