"""Import/export of BLIP checkpoints: tiny random transformers BLIP models built in-process
(no download) must give capfilt the same ITM probabilities, ITC similarities, LM logits and greedy
captions as transformers; round trips are exact; BLIP's original .pth layout loads too."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
)

from capfilt.cli.main import app
from capfilt.config import ConfigError, load_recipe
from capfilt.config.schema import CaptionConfig
from capfilt.data.transforms import CLIP_MEAN, CLIP_STD
from capfilt.model import build_model, load_model_folder, save_model_folder, tokenize
from capfilt.model.convert.blip_pth import import_blip_state_dict, load_blip_pth
from capfilt.model.convert.fill import BLIP_PROMPT
from capfilt.model.convert.transformers_io import med_to_hf, write_transformers_folder
from capfilt.model.folder import META
from capfilt.model.generate import generate_captions
from capfilt.model.med import is_training_state, set_vision_layer_norm_eps
from capfilt.pipeline.filter import score_pairs
from capfilt.runs.convert import convert
from capfilt.runs.resolve import load_stage_model
from tests.conftest import build_tiny_model

WORDS = "a picture of the red blue green small big circle square triangle dog cat on left right top bottom next to and with".split()
TEXTS = [
    "a red circle",
    "a picture of a big blue square on the left",
    "green dog",
    "two cats next to a small triangle at the top",
]
VISION = dict(
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A BERT WordPiece tokenizer laid out like BLIP's on the hub: [DEC] is the bos token, no [ENC]."""
    path = tmp_path_factory.mktemp("tok")
    chars = sorted(set("".join(WORDS + TEXTS).replace(" ", "")))
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *WORDS,
        *chars,
        *(f"##{c}" for c in chars),
    ]
    vocab = list(dict.fromkeys(vocab))
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.save_pretrained(str(path))
    return path


def _blip_config(tok, kind: str) -> BlipConfig:
    arch = "BlipForConditionalGeneration" if kind == "captioner" else "BlipForImageTextRetrieval"
    text = dict(
        TEXT,
        vocab_size=len(tok) + 1,  # + [ENC]
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,
    )
    # vision layer_norm_eps stays transformers' default 1e-5 (BLIP's hub configs), not capfilt's 1e-6
    return BlipConfig(
        text_config=text,
        vision_config=dict(VISION, initializer_range=0.02),
        image_text_hidden_size=16,
        architectures=[arch],
    )


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Spread the weights (random init gives near-uniform logits: greedy ties would be luck)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if (
            "LayerNorm" in name
            or "layer_norm" in name
            or name.endswith(("norm.weight", "norm.bias"))
        ):
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
        else:
            p.copy_((0.25 if p.dim() > 1 else 0.05) * noise)


@pytest.fixture(scope="module")
def hf_models(tok_dir, tmp_path_factory):
    """Tiny random transformers BLIP captioner and filter, saved as checkpoint folders."""
    tok = BertTokenizerFast.from_pretrained(str(tok_dir))
    out = {}
    for kind, cls in (
        ("captioner", BlipForConditionalGeneration),
        ("filter", BlipForImageTextRetrieval),
    ):
        torch.manual_seed(1)
        model = cls(_blip_config(tok, kind))
        _randomise(model, seed=2 if kind == "captioner" else 3)
        model.tie_weights()
        model.eval()
        folder = tmp_path_factory.mktemp(f"hf_{kind}")
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        out[kind] = (model, folder)
    return out


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _ids(tokenizer, texts, first):
    ids, mask = tokenize(tokenizer, texts, 35)
    ids = ids.clone()
    ids[:, 0] = first
    return ids, mask


def test_filter_itm_itc_match_transformers(hf_models, images):
    hf, folder = hf_models["filter"]
    model, tokenizer, cfg, meta, _ = load_stage_model(folder, torch.device("cpu"))
    assert meta["stage"] == "filter" and meta["extra"]["imported"]["format"] == "transformers"
    assert (
        cfg.image_size == 32 and cfg.embed_dim == 16 and model.special["enc"] == len(tokenizer) - 1
    )
    assert cfg.max_text_len == 35 and float(model.temp.detach()) == pytest.approx(0.07)  # BLIP's
    texts = TEXTS[:3]
    itm, cosine = score_pairs(
        model, tokenizer, images, torch.arange(3), texts, cfg.max_text_len
    ).wait()
    ids, mask = _ids(tokenizer, texts, model.special["enc"])  # BLIP's ITM input: [ENC] first
    with torch.no_grad():
        ref_itm = hf(
            input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=True
        ).itm_score.softmax(-1)[:, 1]
        cls_ids, _ = tokenize(tokenizer, texts, 35)
        ref_sim = hf(
            input_ids=cls_ids, pixel_values=images, attention_mask=mask, use_itm_head=False
        ).itm_score
        ours_sim = (
            model.image_features(model.encode_image(images))
            @ model.encode_text_features(cls_ids, mask).t()
        )
    assert (itm - ref_itm).abs().max() < 1e-4
    assert (cosine - ref_sim.diagonal()).abs().max() < 1e-4
    assert (ours_sim - ref_sim).abs().max() < 1e-4
    assert itm.std() > 1e-3  # the tiny model is not constant


def test_the_documented_itm_input_gives_capfilts_scores_with_transformers_alone(hf_models, images):
    """docs/blip-checkpoints.md, "ITM input": with the checkpoint's own tokenizer, which has no
    [ENC] (its id would be [UNK]'s), input_ids[:, 0] = len(tokenizer) gives capfilt's scores."""
    hf, folder = hf_models["filter"]
    hub_tokenizer = BertTokenizerFast.from_pretrained(str(folder))
    assert hub_tokenizer.convert_tokens_to_ids("[ENC]") == hub_tokenizer.unk_token_id
    model, tokenizer, cfg, _, _ = load_stage_model(folder, torch.device("cpu"))
    assert model.special["enc"] == len(hub_tokenizer)
    texts = TEXTS[:3]
    itm, _ = score_pairs(model, tokenizer, images, torch.arange(3), texts, cfg.max_text_len).wait()
    batch = hub_tokenizer(texts, padding=True, return_tensors="pt")
    probs = {}
    for first in ("[ENC]", len(hub_tokenizer)):  # the doc's earlier advice, its advice now
        ids = batch["input_ids"].clone()
        ids[:, 0] = hub_tokenizer.convert_tokens_to_ids(first) if first == "[ENC]" else first
        with torch.no_grad():
            probs[first] = hf(
                input_ids=ids,
                pixel_values=images,
                attention_mask=batch["attention_mask"],
                use_itm_head=True,
            ).itm_score.softmax(-1)[:, 1]
    assert (itm - probs[len(hub_tokenizer)]).abs().max() < 1e-4
    assert (itm - probs["[ENC]"]).abs().max() > 1e-3  # [UNK] first: other scores


def test_captioner_logits_and_greedy_match_transformers(hf_models, images):
    hf, folder = hf_models["captioner"]
    model, tokenizer, cfg, meta, _ = load_stage_model(folder, torch.device("cpu"))
    assert meta["stage"] == "captioner" and cfg.max_text_len == 40  # BLIP's, with the prompt
    ids, mask = _ids(tokenizer, TEXTS, model.special["dec"])
    with torch.no_grad():
        embeds = model.encode_image(images[[0, 1, 2, 0]])
        ours = model.lm_logits(embeds, ids, mask)
        ref = hf(pixel_values=images[[0, 1, 2, 0]], input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (ours[keep] - ref[keep]).abs().max() < 1e-4

    settings = CaptionConfig(
        method="greedy", min_length=2, max_length=12, prompt=BLIP_PROMPT, repetition_penalty=1.0
    )
    captions = [c[0] for c in generate_captions(model, tokenizer, images, settings)]
    prompt = tokenizer([BLIP_PROMPT.strip()] * len(images), return_tensors="pt")
    sp = model.special
    with torch.no_grad():
        out = hf.generate(
            pixel_values=images,
            input_ids=prompt["input_ids"],
            attention_mask=prompt["attention_mask"],
            do_sample=False,
            num_beams=1,
            min_new_tokens=settings.min_length,
            max_new_tokens=settings.max_length,
            suppress_tokens=[
                sp["pad"],
                sp["cls"],
                sp["enc"],
                sp["dec"],
            ],  # capfilt never generates these
        )
    start = prompt["input_ids"].shape[1] - 1  # generate() drops the prompt's [SEP]
    ref_captions = []
    for row in out[:, start:].tolist():
        row = row[: row.index(sp["sep"])] if sp["sep"] in row else row
        ref_captions.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    assert captions == ref_captions
    assert len(set(captions)) > 1 and all(captions)


LACKING = {
    "captioner": ["itm_head", "temp", "text_proj", "vision_proj"],
    "filter": [
        "temp",
        "text_decoder.cls.predictions",
        "text_decoder.cls.predictions.decoder",
        "text_decoder.cls.predictions.transform.LayerNorm",
        "text_decoder.cls.predictions.transform.dense",
    ],
}


@pytest.mark.parametrize("kind", ["captioner", "filter"])
def test_an_import_initialises_what_the_checkpoint_lacks_the_same_every_time(hf_models, kind):
    """The imported model is built unfilled: whatever the checkpoint lacks (heads, momentum
    copies, queues) must be set all the same, and from a fixed seed, not from torch's state."""
    from capfilt.model.convert.transformers_io import import_transformers

    _, folder = hf_models[kind]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = torch.random.get_rng_state()
        model, _, _, meta = import_transformers(folder)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert meta["extra"]["imported"]["initialised"] == LACKING[kind]
        models.append(model.state_dict())
    first, second = models
    for key, value in first.items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
        assert torch.equal(value, second[key]), key
    for key, value in first.items():
        if key.startswith(("visual_encoder_m.", "text_encoder_m.")):
            online = key.replace("_m.", ".", 1)
            assert torch.equal(value, first[online]), key
    assert torch.allclose(
        first["image_queue"].norm(dim=0), torch.ones(first["image_queue"].shape[1])
    )
    # fresh memory reads as zeros: the heads must hold a new model's values, not just be finite
    if kind == "captioner":
        assert first["itm_head.weight"].std() > 0 and first["vision_proj.weight"].std() > 0
    else:
        assert (first["text_decoder.cls.predictions.transform.LayerNorm.weight"] == 1).all()
        assert first["text_decoder.cls.predictions.transform.dense.weight"].std() > 0
    assert first["queue_ptr"].item() == 0 and (first["idx_queue"] == -1).all()
    # a stage's model is the same without its training state
    staged, *_ = load_stage_model(folder, torch.device("cpu"))
    assert staged.state_dict().keys() == {k for k in first if not is_training_state(k)}
    assert all(torch.equal(v, first[k]) for k, v in staged.state_dict().items())


def _hf_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["captioner", "filter"])
def test_round_trip_transformers_capfilt_transformers(hf_models, tmp_path, kind, monkeypatch):
    hf, folder = hf_models[kind]
    monkeypatch.chdir(folder.parent)  # given as a relative path, recorded as an absolute one
    capfilt_dir, fmt, what = convert(folder.name, tmp_path / "capfilt")
    assert (fmt, what) == ("capfilt", kind)
    meta = json.loads((capfilt_dir / META).read_text())
    assert meta["extra"]["imported"]["source"] == str(folder.resolve())
    assert meta["stage"] == kind and meta["extra"]["vision_layer_norm_eps"] == 1e-5
    assert meta["preprocess"] == {"image_size": 32, "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    back, fmt, _ = convert(capfilt_dir, tmp_path / "hf")
    assert fmt == "transformers"
    cls = type(hf)
    reloaded, info = cls.from_pretrained(str(back), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.vision_config.layer_norm_eps == hf.config.vision_config.layer_norm_eps
    ref, got = _hf_state(hf), _hf_state(reloaded)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    processor = BlipProcessor.from_pretrained(str(back))
    assert processor.image_processor.size["height"] == 32


def test_round_trip_capfilt_transformers_capfilt(tok_dir, tmp_path):
    from capfilt.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tok_dir))
    model = build_tiny_model(tokenizer, seed=5, queue_size=8)
    cfg = model.cfg
    _randomise(model, seed=6)
    for kind in ("captioner", "filter"):
        src = save_model_folder(tmp_path / f"native_{kind}", model, tokenizer, cfg, stage=kind)
        convert(src, tmp_path / f"hf_{kind}")
        again, _, _ = convert(tmp_path / f"hf_{kind}", tmp_path / f"again_{kind}")
        m2, _, cfg2, meta2 = load_model_folder(again)
        assert meta2["extra"]["vision_layer_norm_eps"] == 1e-6
        a, b = model.state_dict(), m2.state_dict()
        held = [k for k in a if k.startswith("visual_encoder.")]
        held += (
            [k for k in a if k.startswith("text_decoder.")]
            if kind == "captioner"
            else [
                k
                for k in a
                if k.startswith(("text_encoder.", "vision_proj.", "text_proj.", "itm_head."))
            ]
        )
        for key in held:
            assert torch.equal(a[key], b[key]), key
        # the side the checkpoint lacks gets the other side's self-attention
        enc_sa = "text_encoder.encoder.layer.1.attention.self.query.weight"
        dec_sa = "text_decoder.bert.encoder.layer.1.attention.self.query.weight"
        assert torch.equal(b[enc_sa], b[dec_sa])
        assert torch.equal(b[dec_sa], a[dec_sa] if kind == "captioner" else a[enc_sa])


def test_an_export_keeps_the_capfilt_settings_that_change_scores(tok_dir, tmp_path, images):
    """transformers' BlipConfig has no max_text_len, ITC temperature, queue, momentum or dropout:
    the export keeps them in its config.json, so a round trip, or the export used as --model,
    gives the model's own config, temperature and scores (texts longer than its 24 tokens too)."""
    from capfilt.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tok_dir))
    settings = dict(max_text_len=24, queue_size=8, momentum=0.9, text_dropout=0.0, vocab_size=400)
    model = build_tiny_model(tokenizer, seed=9, **settings)
    _randomise(model, seed=10)
    with torch.no_grad():
        model.temp.fill_(0.0807)  # trained away from the initial 0.07
    src = save_model_folder(tmp_path / "native", model, tokenizer, model.cfg, stage="filter")
    hf_dir, _, _ = convert(src, tmp_path / "hf")
    back, _, _ = convert(hf_dir, tmp_path / "back")
    _, _, cfg_back, meta_back = load_model_folder(back)
    assert cfg_back == model.cfg
    assert "temp" not in meta_back["extra"]["imported"]["initialised"]

    long_text = " ".join(WORDS[3:] * 2)  # well over 24 tokens
    texts = [TEXTS[0], long_text, long_text]
    assert tokenize(tokenizer, [long_text], 512)[0].shape[1] > 24
    scores = []
    for folder in (src, hf_dir, back):
        staged, tok, cfg, _, _ = load_stage_model(folder, torch.device("cpu"))
        assert cfg == model.cfg and float(staged.temp.detach()) == pytest.approx(0.0807, abs=1e-7)
        scores.append(score_pairs(staged, tok, images, torch.arange(3), texts, cfg.max_text_len))
    ref_itm, ref_cos = scores[0].wait()
    for pending in scores[1:]:
        itm, cos = pending.wait()
        assert torch.allclose(itm, ref_itm, atol=1e-6) and torch.allclose(cos, ref_cos, atol=1e-6)


def test_a_mean_pooled_captioner_exports_and_captions_alike(tok_dir, tmp_path, images):
    """Pooling only shapes ITC, which BlipForConditionalGeneration lacks: a captioner of the
    demo/real-cpu recipes (image_pool, text_pool: mean) exports, and its export captions as it
    does; the same model as a filter is refused before any folder is made."""
    from capfilt.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tok_dir))
    model = build_tiny_model(tokenizer, seed=3, image_pool="mean", text_pool="mean")
    _randomise(model, seed=4)
    src = save_model_folder(tmp_path / "cap", model, tokenizer, model.cfg, stage="captioner")
    with pytest.raises(ValueError, match="image_pool 'mean'"):
        write_transformers_folder(model, tokenizer, model.cfg, tmp_path / "as_filter", "filter")
    assert not (tmp_path / "as_filter").exists()
    hf_dir, _, kind = convert(src, tmp_path / "hf")
    assert kind == "captioner"
    settings = CaptionConfig(method="greedy", min_length=2, max_length=8, repetition_penalty=1.0)
    captions = []
    for folder in (src, hf_dir):
        staged, tok, _, _, _ = load_stage_model(folder, torch.device("cpu"))
        captions.append([c[0] for c in generate_captions(staged, tok, images, settings)])
    assert captions[0] == captions[1] and len(set(captions[0])) > 1


def test_an_import_takes_the_checkpoints_image_processor_statistics(hf_models, tok_dir, tmp_path):
    """The processor's mean/std (not CLIP's) are what the checkpoint's images are normalised
    with; one capfilt's transform cannot follow is refused, not silently replaced."""
    import shutil

    from transformers import BlipImageProcessor

    _, folder = hf_models["filter"]
    src = shutil.copytree(folder, tmp_path / "hf")
    processor = BlipImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    BlipProcessor(processor, BertTokenizerFast.from_pretrained(str(tok_dir))).save_pretrained(src)
    expected = {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    out, _, _ = convert(src, tmp_path / "capfilt")
    assert json.loads((out / META).read_text())["preprocess"] == expected
    *_, meta, _ = load_stage_model(src, torch.device("cpu"))  # the folder as --model
    assert meta["preprocess"] == expected

    bilinear = shutil.copytree(folder, tmp_path / "bilinear")
    BlipImageProcessor(size={"height": 32, "width": 32}, resample=2).save_pretrained(bilinear)
    with pytest.raises(ValueError, match="image processor .*resample 2"):
        convert(bilinear, tmp_path / "refused")


def _blip_vit_name(hf_key: str) -> str:
    """transformers' vision names written out the way BLIP's own vit.py names them."""
    name = hf_key[len("vision_model.") :]
    table = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    if name in table:
        return "visual_encoder." + table[name]
    parts = name.split(".")  # encoder.layers.{i}.<module>.<p>
    i, rest = parts[2], ".".join(parts[3:])
    rest = (
        rest.replace("layer_norm1", "norm1")
        .replace("layer_norm2", "norm2")
        .replace("self_attn.qkv", "attn.qkv")
        .replace("self_attn.projection", "attn.proj")
    )
    return f"visual_encoder.blocks.{i}.{rest}"


def _as_blip_pth(hf, kind):
    sd = {}
    for key, value in hf.state_dict().items():
        sd[_blip_vit_name(key) if key.startswith("vision_model.") else key] = value.clone()
    if kind == "captioner":
        sd["text_decoder.bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    else:  # BLIP's retrieval checkpoints carry momentum copies, queues and the temperature
        for key in [
            k for k in sd if k.startswith(("visual_encoder.", "vision_proj.", "text_proj."))
        ]:
            first, rest = key.split(".", 1)
            sd[f"{first}_m.{rest}"] = sd[key] + 0.01
        for key in [k for k in sd if k.startswith("text_encoder.")]:
            sd["text_encoder_m." + key[len("text_encoder.") :]] = sd[key] + 0.01
        sd["image_queue"] = torch.nn.functional.normalize(torch.randn(16, 8), dim=0)
        sd["text_queue"] = torch.nn.functional.normalize(torch.randn(16, 8), dim=0)
        sd["idx_queue"] = torch.full((1, 8), 7)
        sd["ptr_queue"] = torch.tensor([3])
        sd["temp"] = torch.tensor(0.05)
    return {"model": sd}


@pytest.mark.parametrize("kind", ["captioner", "filter"])
def test_blip_pth_layout_loads_with_same_outputs(hf_models, tok_dir, tmp_path, images, kind):
    from typer.testing import CliRunner

    hf, _ = hf_models[kind]
    blip = _as_blip_pth(hf, kind)
    torch.save(blip, tmp_path / "model.pth")
    (tmp_path / "cfg.json").write_text(json.dumps({"vision_heads": 2, "text_heads": 2}))
    result = CliRunner().invoke(
        app,
        [
            "convert",
            str(tmp_path / "model.pth"),
            str(tmp_path / "out"),
            "--tokenizer",
            str(tok_dir),
            "--model-config",
            str(tmp_path / "cfg.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    model, tokenizer, cfg, meta = load_model_folder(tmp_path / "out")
    assert meta["stage"] == kind and meta["extra"]["imported"]["format"] == "blip-pth"
    model.eval()
    with torch.no_grad():
        embeds = model.encode_image(images)
        if kind == "captioner":
            ids, mask = _ids(tokenizer, TEXTS[:3], model.special["dec"])
            ours = model.lm_logits(embeds, ids, mask)[mask.bool()]
            # BLIP's ViT eps (1e-6) vs the transformers config's 1e-5: equal up to that
            ref = hf(pixel_values=images, input_ids=ids, attention_mask=mask).logits[mask.bool()]
            assert (ours - ref).abs().max() < 1e-3
        else:
            ids, mask = _ids(tokenizer, TEXTS[:3], model.special["enc"])
            ours = model.itm_logits(embeds, ids, mask).softmax(-1)[:, 1]
            ref = hf(input_ids=ids, pixel_values=images, attention_mask=mask).itm_score.softmax(-1)[
                :, 1
            ]
            assert (ours - ref).abs().max() < 1e-3
            sd = blip["model"]
            assert torch.equal(model.visual_encoder_m.pos_embed, sd["visual_encoder_m.pos_embed"])
            assert torch.equal(model.text_queue, sd["text_queue"]) and int(model.queue_ptr) == 3
            assert bool((model.idx_queue == -1).all()) and abs(float(model.temp) - 0.05) < 1e-7
    # with eps set as transformers' config, outputs are equal to 1e-4
    set_vision_layer_norm_eps(model, 1e-5)
    with torch.no_grad():
        embeds = model.encode_image(images)
        hf_embeds = hf.vision_model(pixel_values=images).last_hidden_state
    assert (embeds - hf_embeds).abs().max() < 1e-4


def test_a_blip_pth_without_part_of_its_image_encoder_is_refused(hf_models, tok_dir):
    """Only heads a stage never uses may be missing: a ViT block cannot be made up."""
    from capfilt.model.tokenizer import load_tokenizer

    sd = _as_blip_pth(hf_models["captioner"][0], "captioner")["model"]
    sd = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.blocks.1.mlp.")}
    tok = load_tokenizer(str(tok_dir))
    with pytest.raises(
        ValueError, match="lacks weights .*: visual_encoder.blocks.1.mlp.fc1 has no"
    ):
        import_blip_state_dict(sd, tok, "captioner", {"vision_heads": 2, "text_heads": 2})


def test_export_of_a_pretrain_folder_needs_kind(tok_dir, tmp_path):
    from capfilt.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tok_dir))
    model = build_tiny_model(tokenizer, seed=None, vision_depth=1, text_layers=1, queue_size=8)
    cfg = model.cfg
    src = save_model_folder(tmp_path / "pre", model, tokenizer, cfg, stage="pretrain")
    with pytest.raises(ValueError, match="--kind"):
        convert(src, tmp_path / "hf")
    path, _, kind = convert(src, tmp_path / "hf", kind="filter")
    assert kind == "filter" and BlipForImageTextRetrieval.from_pretrained(str(path)) is not None
    # a folder that holds anything is refused untouched (an earlier model's files would stay)
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(ConfigError, match="already holds .*choose a new or empty folder"):
        convert(src, path, kind="captioner")
    assert sorted(p.name for p in path.iterdir()) == before
    assert (
        med_to_hf(model, cfg, "captioner").config.text_config.bos_token_id == model.special["dec"]
    )
    assert write_transformers_folder  # the folder writer is the public API used by convert
    mean_cfg = dataclasses.replace(cfg, image_pool="mean")
    with pytest.raises(ValueError, match="image_pool"):
        med_to_hf(build_model(mean_cfg, tokenizer), mean_cfg, "filter")
    text_mean_cfg = dataclasses.replace(cfg, text_pool="mean")
    with pytest.raises(ValueError, match="text_pool"):
        med_to_hf(build_model(text_mean_cfg, tokenizer), text_mean_cfg, "filter")
    stem_cfg = dataclasses.replace(cfg, vision_stem=[4, 8, 16])
    with pytest.raises(ValueError, match="vision_stem"):
        med_to_hf(build_model(stem_cfg, tokenizer), stem_cfg, "filter")


def test_convert_errors_name_the_model_and_the_option(hf_models, tok_dir, tmp_path, capsys):
    """A transformers model of another type, a BLIP class capfilt does not import, and a --kind
    value that is not one are each named as such (exit 2), not as 'no capfilt model'."""
    import shutil

    from transformers import BertConfig

    from capfilt.cli.main import main
    from capfilt.model.tokenizer import load_tokenizer

    def refused(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main(["convert", *map(str, args)])
        output = capsys.readouterr()
        assert done.value.code == 2, output
        return " ".join((output.out + output.err).split())

    BertConfig(hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path / "bert")
    assert "a transformers model of type 'bert', not BLIP" in refused(
        tmp_path / "bert", tmp_path / "o"
    )

    _, folder = hf_models["filter"]
    for name, archs in (("blipmodel", ["BlipModel"]), ("unnamed", None)):
        shutil.copytree(folder, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config["architectures"] = archs
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    for kind in ([], ["--kind", "filter"]):  # --kind cannot make a BlipModel a filter
        text = refused(tmp_path / "blipmodel", tmp_path / "o", *kind)
        assert "a BlipModel: capfilt imports only BlipForConditionalGeneration" in text
        assert "pass" not in text
    assert "pass --kind captioner or --kind filter" in refused(tmp_path / "unnamed", tmp_path / "o")
    _, _, kind = convert(tmp_path / "unnamed", tmp_path / "unnamed_filter", kind="filter")
    assert kind == "filter"

    tokenizer = load_tokenizer(str(tok_dir))
    model = build_tiny_model(tokenizer, seed=None, vision_depth=1, text_layers=1, queue_size=8)
    pre = save_model_folder(tmp_path / "pre", model, tokenizer, model.cfg, stage="pretrain")
    text = refused(pre, tmp_path / "o", "--kind", "captioners")
    assert "--kind 'captioners': choose captioner or filter" in text


def test_full_blip_pth_imports_as_pretrain(tok_dir, tmp_path):
    from capfilt.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tok_dir))
    model = build_tiny_model(tokenizer, seed=7, vision_depth=1, text_layers=1, queue_size=8)
    _randomise(model, seed=8)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["ptr_queue"] = sd.pop("queue_ptr") + 5
    sd["text_encoder_m.encoder.layer.0.crossattention.self.query.weight"] = torch.zeros(
        32, 32
    )  # BLIP has it
    sd["text_encoder.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save({"model": sd}, tmp_path / "model_base.pth")
    imported, cfg2, meta = import_blip_state_dict(
        load_blip_pth(tmp_path / "model_base.pth"),
        tokenizer,
        model_config={"vision_heads": 2, "text_heads": 2},
    )
    assert meta["stage"] == "pretrain" and meta["extra"]["imported"]["initialised"] == []
    assert meta["extra"]["imported"]["momentum"] == "loaded" and cfg2.queue_size == 8
    got = imported.state_dict()
    for key, value in model.state_dict().items():
        if key not in ("idx_queue", "queue_ptr"):
            assert torch.equal(got[key], value), key
    assert int(imported.queue_ptr) == 5 and bool((imported.idx_queue == -1).all())


@pytest.mark.parametrize(
    "spec",
    ["runs/capp", "./runs/capp", "runs/capp/", "/no/such/model", "~/capp", "a/b/c", "owner/.."],
)
def test_a_missing_local_path_is_never_a_hub_id(tmp_path, monkeypatch, spec):
    """A mistyped local path fails at once with the path in the message, and never goes to the hub."""
    import re

    import huggingface_hub

    from capfilt.config import ConfigError
    from capfilt.model.convert import transformers_io

    def no_network(*args, **kwargs):
        pytest.fail(f"{spec!r} was sent to the hub")

    monkeypatch.setattr(transformers_io, "fetch_hub_checkpoint", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    message = f"no capfilt model at {re.escape(spec)}"
    with pytest.raises(ConfigError, match=message):
        load_stage_model(spec, torch.device("cpu"))
    with pytest.raises(ConfigError, match=message):
        convert(spec, tmp_path / "out")


def test_an_owner_name_spec_with_nothing_local_is_a_hub_id(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from capfilt.config import ConfigError

    asked = []

    def offline(repo_id, **kwargs):
        asked.append(repo_id)
        raise LocalEntryNotFoundError(
            "An error happened while trying to locate the files on the Hub and we cannot find "
            "the appropriate snapshot folder for the specified revision on the local disk. "
            "Please check your internet connection and try again."
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    # a spec that may as well be a mistyped path: said so, without the hub client's paragraph
    with pytest.raises(ConfigError) as caught:
        load_stage_model("run/captioner", torch.device("cpu"))
    assert str(caught.value) == (
        "'run/captioner': no such local folder, and the hub could not be reached to look for it "
        "(offline?), nor is it in the local hub cache"
    )
    assert asked == ["run/captioner"]


def test_text_stack_equals_transformers_blip_text_with_padding_and_shared_image_kv():
    """capfilt's SDPA text stack loads transformers' BlipText* state dicts key for key and computes
    the same states/logits (padded rows, causal decoder); image keys/values computed once and
    indexed per text give what per-pair image tokens give."""
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

    from capfilt.model.med import MED

    torch.manual_seed(0)
    special = {"pad": 0, "cls": 1, "sep": 2, "enc": 3, "dec": 4}
    model = MED(load_recipe("tiny").model, 60, special).eval()
    tc = model.text_encoder.config
    hf_cfg = BlipTextConfig(
        vocab_size=60,
        hidden_size=tc.hidden_size,
        encoder_hidden_size=tc.encoder_hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers,
        num_attention_heads=tc.num_attention_heads,
        max_position_embeddings=tc.max_position_embeddings,
        layer_norm_eps=tc.layer_norm_eps,
        pad_token_id=0,
        is_decoder=True,
    )
    hf_enc = BlipTextModel(hf_cfg, add_pooling_layer=False).eval()
    hf_dec = BlipTextLMHeadModel(hf_cfg).eval()
    for hf, ours in ((hf_enc, model.text_encoder), (hf_dec, model.text_decoder)):
        missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
        assert not unexpected and all(k.endswith("position_ids") for k in missing)
    ids = torch.randint(5, 60, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    keep = mask.bool()
    img = torch.randn(2, 5, tc.encoder_hidden_size)
    index = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        for kwargs in ({}, {"encoder_hidden_states": img[index]}):
            ours = model.text_encoder(ids, mask, **kwargs).last_hidden_state
            ref = hf_enc(input_ids=ids, attention_mask=mask, is_decoder=False, **kwargs)
            assert (ours - ref.last_hidden_state)[keep].abs().max() < 1e-5
        ours = model.text_decoder(ids, mask, encoder_hidden_states=img[index]).logits
        ref = hf_dec(input_ids=ids, attention_mask=mask, encoder_hidden_states=img[index]).logits
        assert (ours - ref)[keep].abs().max() < 1e-5
        assert ref[keep].std() > 0.1  # not a degenerate comparison
        # the [CLS]/[ENC] row alone in the last layer: the same numbers as the full pass
        first = model.encode_text(ids, mask, first_only=True)
        assert (first - model.encode_text(ids, mask)[:, :1]).abs().max() < 1e-6
        states = model.multimodal_embeds(img[index], ids, mask)
        first = model.multimodal_embeds(img[index], ids, mask, first_only=True)
        assert first.shape[1] == 1 and (first - states[:, :1]).abs().max() < 1e-6
        shared = model.itm_logits(None, ids, mask, model.image_cross_kv(img), index)
        assert (shared - model.itm_logits(img[index], ids, mask)).abs().max() < 1e-5


def test_a_stage_refuses_a_head_its_checkpoint_never_held(hf_models, tmp_path):
    """A transformers captioner holds no ITM head and a retrieval model no LM head: the import
    fills them from a seed, and filtering or captioning with them would be noise."""
    import io
    import tarfile

    from PIL import Image

    from capfilt.model.convert.transformers_io import import_transformers
    from capfilt.pipeline.caption import caption_shards
    from capfilt.pipeline.filter import filter_shards
    from capfilt.runs.resolve import STAGE_HEADS, check_heads_trained

    for kind, held, lacking in (
        ("captioner", ("lm",), ("itm", "itc")),
        ("filter", ("itm", "itc"), ("lm",)),
    ):
        _, folder = hf_models[kind]
        meta = import_transformers(folder)[3]
        check_heads_trained(meta, folder, held, "this use")
        for head in lacking:
            with pytest.raises(ConfigError, match=STAGE_HEADS[head][1]):
                check_heads_trained(meta, folder, (head,), "this use")
    shard = tmp_path / "web.tar"
    image = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(image, "JPEG")
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a.jpg", image.getvalue()), ("a.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(
        ConfigError, match="the ITM head of this captioner was not in the checkpoint"
    ):
        filter_shards(
            hf_models["captioner"][1], [str(shard)], tmp_path / "f", load_recipe("tiny").filter
        )
    with pytest.raises(ConfigError, match="captioning needs a captioner"):
        caption_shards(
            hf_models["filter"][1], [str(shard)], tmp_path / "c", load_recipe("tiny").caption
        )
    assert not any((tmp_path / "f").glob("*.tar")) and not any((tmp_path / "c").glob("*.tar"))


def test_bootstrap_judges_its_released_models_before_its_first_stage(
    hf_models, tmp_path, monkeypatch
):
    """A transformers captioner given as --filter, or a mistyped hub id, stops bootstrap before
    it captions (and before it makes its run folder); the heads its import would lack are told
    from the checkpoint's config alone, as the import finds them."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from capfilt.model.convert.transformers_io import import_transformers
    from capfilt.pipeline.bootstrap import BootstrapInputs, run_bootstrap
    from capfilt.runs.resolve import STAGE_HEADS, check_heads_trained, peek_stage_model

    def refuses(meta, folder, head) -> bool:
        try:
            check_heads_trained(meta, folder, (head,), "this use")
        except ConfigError:
            return True
        return False

    for kind in ("captioner", "filter"):
        _, folder = hf_models[kind]
        peeked, imported = peek_stage_model(folder)[0], import_transformers(folder)[3]
        assert peeked["stage"] == imported["stage"] == kind
        for head in STAGE_HEADS:
            assert refuses(peeked, folder, head) == refuses(imported, folder, head), (kind, head)

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("cannot find the appropriate snapshot folder")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    web = tmp_path / "web"
    web.mkdir()
    (web / "00000000.tar").write_bytes(b"")  # never read: the run stops before its first stage
    recipe = load_recipe("tiny")
    captioner = str(hf_models["captioner"][1])
    for filter_model, said in (
        (captioner, r"--filter: .*the ITM head of this captioner was not in the checkpoint"),
        (
            "Salesforce/blip-itm-base-cocoo",
            "--filter: 'Salesforce/blip-itm-base-cocoo': no such local folder, and the hub "
            "could not be reached",
        ),
    ):
        inputs = BootstrapInputs(web=[str(web)], captioner=captioner, filter=filter_model)
        with pytest.raises(ConfigError, match=said):
            run_bootstrap(recipe, inputs, tmp_path / "run")
        assert not (tmp_path / "run").exists()
