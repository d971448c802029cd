"""ModelConfig <-> transformers' ``BlipConfig``, and which kind a transformers config holds."""

from __future__ import annotations

from capfilt.config import from_dict, to_dict
from capfilt.config.schema import ModelConfig
from capfilt.model.convert.keymaps import ARCHITECTURES, KINDS
from capfilt.model.med import MAX_POSITIONS, MED, vision_layer_norm_eps

TEXT_LEN = {"captioner": 40, "filter": 35, "pretrain": 35}
"""``max_text_len`` given to imported models (BLIP: 35 tokens for ITM, 40 for captioning)."""
EXPORT_KEY = "capfilt"
"""Key of an exported transformers ``config.json`` that keeps what ``BlipConfig`` has no field
for: the model's capfilt ``model_config`` (``max_text_len``, the ITC queue and momentum, dropout,
...) and its trained ITC ``temp``. transformers keeps unknown config keys through save and load,
so an import of the export gets the model back as it was, with the same scores."""


def _square(value, what: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(f"{what}: capfilt's ViT needs a square {what}, got {value}")
        value = value[0]
    return int(value)


def model_config_from_hf(config, kind: str) -> tuple[ModelConfig, float, float | None]:
    """(ModelConfig, vision LayerNorm eps, trained ITC temperature or None) of a transformers
    ``BlipConfig``; refuses what capfilt cannot run identically (non-GELU activations, a text
    position table other than 512, ...).

    The one place that decides an import's capfilt settings: a capfilt export's own
    (:data:`EXPORT_KEY`), BLIP's for a checkpoint from elsewhere (``max_text_len`` 35 or 40, the
    temperature a new model starts with)."""
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
    shape = dict(  # what the weights are shaped by: the transformers config decides
        image_size=_square(vc.image_size, "image_size"),
        patch_size=_square(vc.patch_size, "patch_size"),
        vision_width=vc.hidden_size,
        vision_depth=vc.num_hidden_layers,
        vision_heads=vc.num_attention_heads,
        text_width=tc.hidden_size,
        text_layers=tc.num_hidden_layers,
        text_heads=tc.num_attention_heads,
        text_intermediate=tc.intermediate_size,
        embed_dim=config.image_text_hidden_size,
    )
    saved = getattr(config, EXPORT_KEY, None) or {}
    if saved.get("model_config"):  # exported by capfilt: its settings beyond the weights' shapes
        cfg = from_dict(ModelConfig, {**saved["model_config"], **shape})
    else:
        cfg = ModelConfig(**shape, vocab_size=tc.vocab_size, max_text_len=TEXT_LEN[kind])
    cfg.validate()
    temp = saved.get("temp")
    return cfg, float(vc.layer_norm_eps), None if temp is None else float(temp)


def hf_config_from_model(model: MED, cfg: ModelConfig, kind: str, eps: float | None = None):
    """The transformers ``BlipConfig`` of a MED exported as ``kind``."""
    from transformers import BlipConfig

    # BlipForConditionalGeneration has no ITC part: how ITC pools its features only matters to a filter
    if kind == "filter" and cfg.image_pool != "cls":
        raise ValueError(
            f"model.image_pool '{cfg.image_pool}': transformers' BLIP takes the ITC image feature from the [CLS] "
            "token, so this model's ITC scores would change on export; export a model trained with image_pool: cls"
        )
    if kind == "filter" and cfg.text_pool != "cls":
        raise ValueError(
            f"model.text_pool '{cfg.text_pool}': transformers' BLIP takes the ITC text feature from the [CLS] "
            "token, so this model's ITC scores would change on export; export a model trained with text_pool: cls"
        )
    if cfg.vision_stem:
        raise ValueError(
            f"model.vision_stem {list(cfg.vision_stem)}: transformers' BLIP embeds patches with one "
            "linear convolution and has no convolutional stem; export a model trained without vision_stem"
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
        # transformers' BLIP has no place for these, and the text length and temperature change
        # scores: an import reads them back (model_config_from_hf)
        **{EXPORT_KEY: {"model_config": to_dict(cfg), "temp": float(model.temp.detach())}},
    )


def kind_of_hf_config(config, kind: str | None) -> str:
    """``kind`` checked against the config's ``architectures``, or read from them."""
    archs = list(getattr(config, "architectures", None) or [])
    found = [k for k, a in ARCHITECTURES.items() if a in archs]
    supported = "BlipForConditionalGeneration (captioner) and BlipForImageTextRetrieval (filter)"
    if archs and not found:  # another class's weights (BlipModel, ...): no kind loads them
        raise ValueError(
            f"the checkpoint is a {', '.join(archs)}: capfilt imports only {supported}"
        )
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(
                f"--kind: choose captioner or filter for a transformers checkpoint, got '{kind}'"
            )
        if found and found[0] != kind:
            raise ValueError(f"the checkpoint is a {archs[0]} ({found[0]}), not a {kind}")
        return kind
    if not found:
        raise ValueError(
            f"the checkpoint's config names no architectures: capfilt imports {supported}; "
            "pass --kind captioner or --kind filter to capfilt convert to say which it holds"
        )
    return found[0]
