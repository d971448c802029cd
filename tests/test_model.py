"""The MED model (docs/architecture.md §1): tokenizer, weight sharing, momentum, queues, losses end to end, folders."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from capfilt.config import ConfigError, ModelConfig
from capfilt.model import (
    MED,
    LocalGather,
    build_model,
    count_parameters,
    length_chunks,
    load_model_folder,
    load_tokenizer,
    prompt_length,
    save_model_folder,
    special_ids,
    tokenize,
    train_wordpiece_tokenizer,
)
from capfilt.model.folder import CONFIG, META, WEIGHTS
from capfilt.model.med import SHARED_LAYER_PARTS
from tests.conftest import build_tiny_model, tiny_model_config

CAPTIONS = [
    "a red cube left of a blue sphere",
    "two green cones on a wooden table",
    "a picture of a small yellow cylinder",
    "a big purple sphere right of a gray cube",
    "an orange cone behind a white cylinder",
    "a blue cube and a red sphere",
] * 4


TINY = dict(text_dropout=0.0, queue_size=10, max_text_len=16, vocab_size=120)
"""This file's settings on top of the shared tiny config (no dropout: exact comparisons)."""


def tiny_cfg(**kw) -> ModelConfig:
    return tiny_model_config(**{**TINY, **kw})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece_tokenizer(CAPTIONS, 120)


def make_model(tok, seed: int = 0, **kw) -> MED:
    return build_tiny_model(tok, seed, **{**TINY, **kw})


def batch(tok, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    ids, mask = tokenize(tok, CAPTIONS[:n], 16)
    return images, ids, mask


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_specials_and_tokenize(tok):
    sp = special_ids(tok)
    assert sp["pad"] == 0
    assert tok.bos_token == "[DEC]" and sp["dec"] == tok.convert_tokens_to_ids("[DEC]")
    assert len({sp["pad"], sp["cls"], sp["sep"], sp["enc"], sp["dec"]}) == 5
    assert len(tok) <= 120 + 2
    ids, mask = tokenize(
        tok, ["a red cube", "A BIG purple sphere right of a gray cube and a blue cone"], 8
    )
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert (
        ids.shape == mask.shape == (2, 8)
    )  # the long text is cut to max_len, the short one padded
    assert ids[:, 0].tolist() == [sp["cls"]] * 2
    assert ids[1, -1] == sp["sep"]  # [SEP] kept last after truncation
    n0 = int(mask[0].sum())
    assert (
        ids[0, n0 - 1] == sp["sep"]
        and (ids[0, n0:] == sp["pad"]).all()
        and (mask[0, n0:] == 0).all()
    )
    assert tok.decode(ids[0], skip_special_tokens=True) == "a red cube"  # uncased
    assert prompt_length(tok, "a picture of ") == len(tok("a picture of")["input_ids"]) - 1


def test_tokenize_pads_on_the_right_whatever_the_tokenizer_default(tok):
    # positions count from the first token, so a left-padding tokenizer would shift every text
    before = tok.padding_side
    try:
        tok.padding_side = "left"
        ids, mask = tokenize(tok, ["a", "a red cube left of"], 16)
    finally:
        tok.padding_side = before
    assert mask[0].tolist()[:3] == [1, 1, 1] and mask[0, 3:].sum() == 0
    assert ids[0, 0] == special_ids(tok)["cls"]


def test_length_chunks_order_rows_by_length_and_cut_each_chunk_to_its_longest():
    lengths = [5, 2, 7, 2, 3]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    chunks = length_chunks(mask, 2)
    # ties keep their input order (rows 1 and 3); the last chunk holds what is left
    assert [(rows.tolist(), width) for rows, width in chunks] == [
        ([1, 3], 2),
        ([4, 0], 5),
        ([2], 7),
    ]
    assert length_chunks(mask[:0], 2) == []
    with pytest.raises(ValueError, match="rows must be >= 1"):
        length_chunks(mask, 0)


def test_itm_scored_in_length_chunks_equals_the_whole_padded_batch(tok):
    model = make_model(tok).eval()
    images, ids, mask = batch(tok, 6)
    texts = ["a cube", *CAPTIONS[:4], "a big purple sphere right of a gray cube behind a red cone"]
    ids, mask = tokenize(tok, texts, 16)
    index = torch.tensor([0, 1, 1, 0, 2, 2])
    with torch.no_grad():
        cross_kv = model.image_cross_kv(model.encode_image(images[:3]))
        whole = model.itm_logits(None, ids, mask, cross_kv, index)
        chunked = torch.empty_like(whole)
        chunks = length_chunks(mask, 4)
        for rows, width in chunks:
            chunked[rows] = model.itm_logits(
                None, ids[rows, :width], mask[rows, :width], cross_kv, index[rows]
            )
    assert chunks[0][1] < ids.shape[1]  # the short chunk really was cut
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_tokenizer_training_is_deterministic():
    # the tokenizers library's own WordPiece trainer breaks ties by hash order; ours by string order
    texts = [
        f"{c} {s} {p} of a {c2} {s}"
        for c in ("red", "teal", "tan")
        for c2 in ("gray", "pink")
        for s in ("cube", "cone", "torus")
        for p in ("left", "right", "behind")
    ]
    vocabs = [train_wordpiece_tokenizer(texts, 90).get_vocab() for _ in range(4)]
    assert all(v == vocabs[0] for v in vocabs)
    assert 60 < len(vocabs[0]) <= 92


def test_wordpiece_learner_merges_by_frequency_then_string_order():
    from collections import Counter

    from capfilt.model.wordpiece import learn_wordpiece_vocab

    vocab = learn_wordpiece_vocab(Counter({"aab": 5, "ab": 2, "ba": 1}), 20, specials=["[PAD]"])
    # alphabet: first characters plain, the rest ##-prefixed, sorted; then merges:
    # (a, ##a) 5, (##a, ##b) 5, (a, ##b) 2, (b, ##a) 1: the tie at 5 goes to the smaller pair
    # (##a, ##b); then (a, ##ab) 5, then (a, ##b) 2; min_frequency 2 stops before (b, ##a)
    assert vocab == ["[PAD]", "##a", "##b", "a", "b", "##ab", "aab", "ab"]


def test_tokenizer_round_trip_and_blip_tokens_added(tok, tmp_path):
    tok.save_pretrained(tmp_path / "t")
    loaded = load_tokenizer(str(tmp_path / "t"))
    assert special_ids(loaded) == special_ids(tok) and len(loaded) == len(tok)
    assert (
        tokenize(loaded, CAPTIONS[:3], 12)[0].tolist()
        == tokenize(tok, CAPTIONS[:3], 12)[0].tolist()
    )

    # a plain BERT-style tokenizer without [DEC]/[ENC] gets them on load (BLIP style)
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    plain.save_pretrained(tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    assert cfg.get("bos_token") is None
    loaded = load_tokenizer(str(tmp_path / "plain"))
    assert loaded.bos_token == "[DEC]" and "[ENC]" in loaded.all_special_tokens
    assert special_ids(loaded)["enc"] != special_ids(loaded)["dec"]
    with pytest.raises(ValueError):
        load_tokenizer(str(tmp_path / "missing-folder-xyz"))


# ---------------------------------------------------------------- structure


def test_encoder_decoder_share_all_but_self_attention(tok):
    model = make_model(tok)
    enc, dec = model.text_encoder, model.text_decoder.bert
    assert dec.embeddings.word_embeddings.weight is enc.embeddings.word_embeddings.weight
    assert dec.embeddings.position_embeddings.weight is enc.embeddings.position_embeddings.weight
    assert (
        model.text_decoder.cls.predictions.decoder.weight is enc.embeddings.word_embeddings.weight
    )
    for le, ld in zip(enc.encoder.layer, dec.encoder.layer, strict=True):
        for part in SHARED_LAYER_PARTS:
            pe, pd = (
                dict(getattr(le, part).named_parameters()),
                dict(getattr(ld, part).named_parameters()),
            )
            assert pe.keys() == pd.keys() and pe
            assert all(pe[k] is pd[k] for k in pe)
        se, sd = dict(le.attention.named_parameters()), dict(ld.attention.named_parameters())
        assert se.keys() == sd.keys()
        assert all(se[k] is not sd[k] and se[k].data_ptr() != sd[k].data_ptr() for k in se)
    # shared tensors are counted once: the decoder adds only its self-attention and LM-head transform
    own = {id(p) for p in model.text_encoder.parameters()}
    extra = [p for p in model.text_decoder.parameters() if id(p) not in own]
    w, layers = 32, 2
    self_attn = layers * (4 * (w * w + w) + 2 * w)
    head = w * w + w + 2 * w + len(tok)  # transform dense + LayerNorm + output bias
    assert sum(p.numel() for p in extra) == self_attn + head


def test_vit_outputs_all_tokens_and_heads(tok):
    model = make_model(tok)
    images, ids, mask = batch(tok)
    emb = model.encode_image(images)
    assert emb.shape == (4, 1 + (32 // 8) ** 2, 32)
    ln = model.visual_encoder.norm
    assert ln.eps == 1e-6 and model.visual_encoder.blocks[0].attn.qkv.bias is not None
    feats = model.image_features(emb)
    assert feats.shape == (4, 16) and torch.allclose(feats.norm(dim=1), torch.ones(4))
    tf = model.encode_text_features(ids, mask)
    assert tf.shape == (4, 16) and torch.allclose(tf.norm(dim=1), torch.ones(4))
    assert model.itm_logits(emb, ids, mask).shape == (4, 2)
    assert model.lm_logits(emb, ids, mask).shape == (4, ids.shape[1], len(tok))
    assert model.temp.item() == pytest.approx(0.07)
    with torch.no_grad():
        model.temp.fill_(2.0)
    model.clamp_temp()
    assert model.temp.item() == pytest.approx(0.5)
    with torch.no_grad():
        model.temp.fill_(-1.0)
    model.clamp_temp()
    assert model.temp.item() == pytest.approx(0.001)


def test_conv_stem_replaces_the_patch_embedding(tok, tmp_path):
    # patch 8 = three stride-2 convolutions: the same token grid as BLIP's patch embedding
    model = make_model(tok, vision_stem=[4, 8, 16])
    images, ids, mask = batch(tok)
    emb = model.encode_image(images)
    assert emb.shape == make_model(tok).encode_image(images).shape == (4, 1 + 16, 32)
    params = dict(model.named_parameters())
    assert params["visual_encoder.patch_embed.proj.0.weight"].shape == (4, 3, 3, 3)
    assert params["visual_encoder.patch_embed.proj.9.weight"].shape == (32, 16, 1, 1)
    assert not model.visual_encoder_m.patch_embed.proj[0].weight.requires_grad  # momentum copy
    # a training step moves the stem (and the batch statistics of its norms)
    before = params["visual_encoder.patch_embed.proj.0.weight"].detach().clone()
    norm = model.visual_encoder.patch_embed.proj[1]
    seen = norm.num_batches_tracked.item()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model.forward_pretrain(images, ids, mask)["loss"].backward()
    opt.step()
    assert not torch.equal(before, params["visual_encoder.patch_embed.proj.0.weight"])
    assert norm.num_batches_tracked.item() == seen + 1
    # saved and loaded, the model encodes the same (running statistics included)
    model.eval()
    save_model_folder(tmp_path / "stem", model, tok, model.cfg, stage="pretrain")
    loaded, _, cfg, _ = load_model_folder(tmp_path / "stem")
    assert cfg.vision_stem == [4, 8, 16]
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    with pytest.raises(ConfigError, match="vision_stem"):
        tiny_cfg(vision_stem=[4, 8]).validate()


def test_mean_image_pool_projects_the_mean_patch_token(tok):
    model = make_model(tok, image_pool="mean")
    images, ids, mask = batch(tok)
    emb = model.encode_image(images)
    expected = torch.nn.functional.normalize(model.vision_proj(emb[:, 1:, :].mean(1)), dim=-1)
    assert torch.allclose(model.image_features(emb), expected, atol=1e-6)
    assert not torch.allclose(
        model.image_features(emb), make_model(tok).image_features(emb), atol=1e-3
    )
    # the momentum branch pools the same way: with equal weights, online and momentum features agree
    out = model.forward_pretrain(images, ids, mask, weights=("itc",), alpha=0.0)
    assert torch.isfinite(out["loss_itc"])
    with torch.no_grad():
        feat_m = torch.nn.functional.normalize(
            model.vision_proj_m(model.pool_image(model.visual_encoder_m.forward_features(images))),
            dim=-1,
        )
    assert torch.allclose(feat_m, model.image_features(emb), atol=1e-5)


def test_mean_text_pool_projects_the_mean_token_state_and_ignores_padding(tok):
    from capfilt.model.losses import itc_loss, itc_targets

    model = make_model(tok, text_pool="mean").eval()
    images, ids, mask = batch(tok)
    with torch.no_grad():
        states = model.encode_text(ids, mask)
        w = mask.unsqueeze(-1).float()
        expected = F.normalize(model.text_proj((states * w).sum(1) / w.sum(1)), dim=-1)
        assert torch.allclose(model.encode_text_features(ids, mask), expected, atol=1e-6)
        # two more padding columns change nothing; the [CLS] feature is another one
        ids_pad = torch.cat([ids, torch.full_like(ids[:, :2], model.special["pad"])], 1)
        mask_pad = torch.cat([mask, torch.zeros_like(mask[:, :2])], 1)
        assert torch.allclose(model.encode_text_features(ids_pad, mask_pad), expected, atol=1e-5)
        cls_feat = F.normalize(model.text_proj(states[:, 0]), dim=-1)
        assert not torch.allclose(cls_feat, expected, atol=1e-3)
        # the momentum text encoder pools the same way: the loss equals the hand-built one
        out = model(images, ids, mask, alpha=0.0, weights=("itc",))
        img = model.image_features(model.encode_image(images))
        img_m = F.normalize(
            model.vision_proj_m(model.visual_encoder_m.forward_features(images)[:, 0]), dim=-1
        )
        states_m = model.text_encoder_m(input_ids=ids, attention_mask=mask).last_hidden_state
        txt_m = F.normalize(model.text_proj_m((states_m * w).sum(1) / w.sum(1)), dim=-1)
        targets = itc_targets(torch.arange(4), torch.cat([torch.arange(4), model.idx_queue[0]]))

        def loss_with(text_m):
            return itc_loss(
                img,
                expected,
                torch.cat([img_m, model.image_queue.t()]),
                torch.cat([text_m, model.text_queue.t()]),
                model.temp,
                0.0,
                targets,
            ).item()

    assert out["loss_itc"].item() == pytest.approx(loss_with(txt_m), rel=1e-5)
    cls_m = F.normalize(model.text_proj_m(states_m[:, 0]), dim=-1)
    assert loss_with(cls_m) != pytest.approx(loss_with(txt_m), rel=1e-3)
    with pytest.raises(ConfigError, match="text_pool"):
        tiny_cfg(text_pool="max").validate()


def test_itm_and_itc_heads_run_in_fp32_under_bf16_autocast(tok):
    """The filter thresholds these scores: under bf16 autocast (the encoders' matmuls in bf16) the
    heads still compute in fp32, so scores keep their resolution (a bf16 ITM head gave a tiny
    model's every score as exactly 0.5 on a GPU)."""
    from capfilt.utils.device import autocast

    model = make_model(tok).eval()
    images, ids, mask = batch(tok)
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        embeds = model.encode_image(images)
        states = model.multimodal_embeds(embeds, ids, mask, first_only=True)[:, 0, :]
        logits = model.itm_logits(embeds, ids, mask)
        image_feat = model.image_features(embeds)
        text_feat = model.encode_text_features(ids, mask)
        pooled = model.encode_text(ids, mask, first_only=True)[:, 0, :]
    assert logits.dtype == image_feat.dtype == text_feat.dtype == torch.float32
    head = model.itm_head
    torch.testing.assert_close(logits, states.float() @ head.weight.T + head.bias)
    expected = F.normalize(pooled.float() @ model.text_proj.weight.T + model.text_proj.bias, dim=-1)
    torch.testing.assert_close(text_feat, expected)


def test_decoder_cache_takes_a_prefix_then_one_token_at_a_time(tok):
    """A multi-token feed starts an empty cache (causal within it); later ones must be single
    tokens: is_causal would align a new block's first query with the cache's first key."""
    from capfilt.model.text import KVCache

    model = make_model(tok).eval()
    images, ids, _ = batch(tok, n=2)
    cross = model.image_cross_kv(model.encode_image(images))
    cache = KVCache(ids.shape[1] + 4)
    with torch.no_grad():
        model.text_decoder(input_ids=ids[:, :3], cross_kv=cross, cache=cache, last_only=True)
        model.text_decoder(input_ids=ids[:, 3:4], cross_kv=cross, cache=cache, last_only=True)
        assert cache.length == 4
        with pytest.raises(ValueError, match="empty cache"):
            model.text_decoder(input_ids=ids[:, 4:6], cross_kv=cross, cache=cache)


def test_one_token_decoding_steps_equal_the_full_causal_pass(tok):
    # a single query attends through plain matmuls on CPU, a longer one through SDPA: same logits
    from capfilt.model.text import KVCache

    model = make_model(tok).eval()
    images, ids, _ = batch(tok, n=3)
    with torch.no_grad():
        cross = model.image_cross_kv(model.encode_image(images))
        full = model.text_decoder(input_ids=ids[:, :6], cross_kv=cross).logits
        cache = KVCache(6)
        steps = [model.text_decoder(input_ids=ids[:, :2], cross_kv=cross, cache=cache).logits]
        for t in range(2, 6):
            step = model.text_decoder(input_ids=ids[:, t : t + 1], cross_kv=cross, cache=cache)
            steps.append(step.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_pretrain_forward_compiles_into_one_graph_with_the_eager_losses(tok):
    """``train.compile``: the pretraining forward traces without graph breaks (its data checks
    are left to the trainer while compiling) and gives the eager losses."""
    import copy

    from torch._dynamo.utils import counters

    model = make_model(tok).train()
    twin = copy.deepcopy(model)
    images, ids, mask = batch(tok)
    image_ids = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    eager = model(images, ids, mask, image_ids=image_ids, alpha=0.4)
    counters.clear()
    torch.manual_seed(0)
    compiled = torch.compile(twin, backend="aot_eager")(
        images, ids, mask, image_ids=image_ids, alpha=0.4
    )
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    for key in ("loss_itc", "loss_itm", "loss_lm"):
        torch.testing.assert_close(compiled[key], eager[key])


def test_fan_in_init_scales_with_width(tok):
    bert = make_model(tok, vision_width=64, text_width=64, text_intermediate=128)
    fan = make_model(
        tok, vision_width=64, text_width=64, text_intermediate=128, weight_init="fan_in"
    )
    ffn_bert = bert.text_encoder.encoder.layer[0].intermediate.dense.weight
    ffn_fan = fan.text_encoder.encoder.layer[0].intermediate.dense.weight
    assert ffn_bert.std().item() == pytest.approx(0.02, rel=0.1)
    assert ffn_fan.std().item() == pytest.approx(64**-0.5, rel=0.1)
    qkv = fan.visual_encoder.blocks[0].attn.qkv.weight
    assert qkv.std().item() == pytest.approx(64**-0.5, rel=0.1)
    words = fan.text_encoder.embeddings.word_embeddings
    assert words.weight[words.padding_idx].abs().sum() == 0
    # momentum copies start equal, decoder weights stay tied to the encoder's
    assert torch.equal(fan.visual_encoder_m.blocks[0].attn.qkv.weight, qkv)
    assert fan.text_decoder.cls.predictions.decoder.weight is words.weight


def test_momentum_copy_and_update_exact(tok):
    model = make_model(tok)
    online, mom = model._momentum_params()
    assert len(online) == len(mom) > 0
    assert all(not p.requires_grad for p in mom) and all(p.requires_grad for p in online)
    assert all(torch.equal(p, q) for p, q in zip(online, mom, strict=True))
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in mom]
    m = model.cfg.momentum
    model.momentum_update()
    for p, p_m, old in zip(online, mom, before, strict=True):
        assert torch.allclose(p_m, m * old + (1 - m) * p, rtol=0, atol=1e-6)
    # momentum params come from the four momentum modules only, never from the online ones
    ids_online = {id(p) for p in online}
    assert not any(id(p) in ids_online for p in mom)
    model.momentum_update(momentum=0.0)
    assert all(torch.equal(p, q) for p, q in zip(online, mom, strict=True))


def test_queue_wraps_around(tok):
    model = make_model(tok)  # queue_size 10, embed_dim 16
    feats = [F.normalize(torch.randn(4, 16), dim=1) for _ in range(3)]
    for i, f in enumerate(feats):
        model.dequeue_and_enqueue(f, -f, torch.arange(4) + 10 * i)
        assert model.queue_ptr.item() == (4 * (i + 1)) % 10
    q = model.image_queue.t()
    assert torch.equal(q[0:2], feats[2][2:4])  # wrapped part of the third batch
    assert torch.equal(q[2:4], feats[0][2:4])  # not yet overwritten
    assert torch.equal(q[4:8], feats[1])
    assert torch.equal(q[8:10], feats[2][0:2])
    assert torch.equal(model.text_queue.t()[4:8], -feats[1])
    assert model.idx_queue.tolist() == [[22, 23, 2, 3, 10, 11, 12, 13, 20, 21]]
    # a batch larger than the queue keeps its last queue_size rows, in ring order
    big = F.normalize(torch.randn(12, 16), dim=1)
    model.dequeue_and_enqueue(big, big, torch.arange(12))
    assert model.queue_ptr.item() == (2 + 12) % 10
    assert torch.equal(model.image_queue.t()[(4 + torch.arange(10)) % 10], big[2:])


# ---------------------------------------------------------------- masks


def test_decoder_is_causal_and_encoder_bidirectional(tok):
    model = make_model(tok).eval()
    images, ids, mask = batch(tok)
    emb = model.encode_image(images)
    ids2 = ids.clone()
    ids2[:, 4] = (ids[:, 4] + 7) % len(tok)
    with torch.no_grad():
        lm1, lm2 = model.lm_logits(emb, ids, mask), model.lm_logits(emb, ids2, mask)
        assert torch.allclose(lm1[:, :4], lm2[:, :4], atol=1e-6)
        assert not torch.allclose(lm1[:, 4:], lm2[:, 4:], atol=1e-4)
        t1, t2 = model.encode_text(ids, mask), model.encode_text(ids2, mask)
        assert not torch.allclose(t1[:, 0], t2[:, 0], atol=1e-4)  # [CLS] sees later tokens
        m1, m2 = model.multimodal_embeds(emb, ids, mask), model.multimodal_embeds(emb, ids2, mask)
        assert not torch.allclose(m1[:, 0], m2[:, 0], atol=1e-4)
        # the image-grounded modes look at the image, the unimodal encoder does not take it
        emb_other = model.encode_image(torch.randn_like(images))
        assert not torch.allclose(
            model.itm_logits(emb, ids, mask), model.itm_logits(emb_other, ids, mask), atol=1e-5
        )
        assert not torch.allclose(lm1, model.lm_logits(emb_other, ids, mask), atol=1e-5)
        # the first token is replaced by [ENC] / [DEC] whatever the input holds
        ids3 = ids.clone()
        ids3[:, 0] = 7
        assert torch.allclose(model.itm_logits(emb, ids3, mask), model.itm_logits(emb, ids, mask))
        # extra padding changes nothing (ITM pads token ids across ranks)
        ids_p, mask_p = F.pad(ids, (0, 3)), F.pad(mask, (0, 3))
        assert torch.allclose(
            model.itm_logits(emb, ids_p, mask_p), model.itm_logits(emb, ids, mask), atol=1e-5
        )
        assert torch.allclose(
            model.lm_logits(emb, ids_p, mask_p)[:, : ids.shape[1]], lm1, atol=1e-5
        )


# ---------------------------------------------------------------- losses end to end


def test_forward_pretrain_losses_backward_and_queue(tok):
    model = make_model(tok).train()
    images, ids, mask = batch(tok)
    g = torch.Generator().manual_seed(0)
    out = model(images, ids, mask, alpha=0.4, generator=g)
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_lm"}
    assert all(torch.isfinite(v) for v in out.values())
    # at init: ITC near ln(global batch + queue) (random features, temp 0.07), ITM of the order of
    # ln 2 (an untrained nn.Linear head), LM near ln V
    assert 0.5 * math.log(4 + 10) < out["loss_itc"].item() < 3 * math.log(4 + 10)
    assert 0.5 * math.log(2) < out["loss_itm"].item() < 2.5 * math.log(2)
    assert 0.5 * math.log(len(tok)) < out["loss_lm"].item() < 1.5 * math.log(len(tok))
    assert out["loss"].item() == pytest.approx(
        sum(out[k].item() for k in ("loss_itc", "loss_itm", "loss_lm")), rel=1e-6
    )
    out["loss"].backward()
    for p in (
        model.temp,
        model.itm_head.weight,
        model.vision_proj.weight,
        model.text_proj.weight,
        model.visual_encoder.patch_embed.proj.weight,
        model.text_encoder.embeddings.word_embeddings.weight,
        model.text_encoder.encoder.layer[0].crossattention.self.key.weight,
        model.text_decoder.bert.encoder.layer[0].attention.self.query.weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model._momentum_params()[1])
    # the queue got the momentum features of the batch
    assert model.queue_ptr.item() == 4
    with torch.no_grad():
        feat_m = F.normalize(
            model.vision_proj_m(model.visual_encoder_m.forward_features(images)[:, 0]), dim=-1
        )
    assert torch.allclose(model.image_queue.t()[:4], feat_m, atol=1e-5)
    assert model.idx_queue[0, :4].tolist() == [-1] * 4  # no image ids given
    # eval mode leaves the queue alone
    model.eval()
    model(images, ids, mask, generator=g)
    assert model.queue_ptr.item() == 4


def test_forward_loss_selection_prompt_and_image_ids(tok):
    model = make_model(tok).train()
    images, ids, mask = batch(tok)
    lm = model.forward_pretrain(images, ids, mask, weights=("lm",))
    assert (
        lm["loss_itc"].item() == 0
        and lm["loss_itm"].item() == 0
        and lm["loss"].item() == lm["loss_lm"].item()
    )
    assert model.queue_ptr.item() == 0  # no ITC, no enqueue
    lm_p = model.forward_pretrain(images, ids, mask, weights=("lm",), prompt_len=3)
    assert lm_p["loss_lm"].item() != pytest.approx(lm["loss_lm"].item())
    filt = model.forward_pretrain(
        images,
        ids,
        mask,
        image_ids=torch.tensor([3, 4, 3, 5]),
        alpha=0.4,
        weights=("itc", "itm"),
        generator=torch.Generator().manual_seed(0),
    )
    assert (
        filt["loss_lm"].item() == 0 and filt["loss_itc"].item() > 0 and filt["loss_itm"].item() > 0
    )
    assert model.idx_queue[0, :4].tolist() == [3, 4, 3, 5]
    with pytest.raises(ValueError, match="weights"):
        model(images, ids, mask, weights=("itc", "mlm"))
    with pytest.raises(ValueError, match=">= 0"):
        model(images, ids, mask, image_ids=torch.tensor([0, -2, 1, 2]))
    # ITM without a second image: a clear error, ITC alone still works
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        model(images[:1], ids[:1], mask[:1])
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        model(images, ids, mask, image_ids=torch.tensor([1, 1, 1, 1]))
    only_itc = model(images, ids, mask, image_ids=torch.tensor([1, 1, 1, 1]), weights=("itc",))
    assert torch.isfinite(only_itc["loss"])


def test_itc_uses_image_id_targets(tok):
    """Samples sharing an image id are positives: with identical ids for a duplicated pair the
    loss equals the hand-built soft-target computation."""
    from capfilt.model.losses import itc_loss, itc_targets

    model = make_model(tok).eval()
    images, ids, mask = batch(tok)
    image_ids = torch.tensor([0, 1, 0, 2])
    with torch.no_grad():
        out = model(images, ids, mask, image_ids=image_ids, alpha=0.0, weights=("itc",))
        img = model.image_features(model.encode_image(images))
        txt = model.encode_text_features(ids, mask)
        img_m = F.normalize(
            model.vision_proj_m(model.visual_encoder_m.forward_features(images)[:, 0]), dim=-1
        )
        txt_m = F.normalize(
            model.text_proj_m(
                model.text_encoder_m(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            ),
            dim=-1,
        )
        img_all = torch.cat([img_m, model.image_queue.t()])
        txt_all = torch.cat([txt_m, model.text_queue.t()])
        targets = itc_targets(image_ids, torch.cat([image_ids, model.idx_queue[0]]))
        assert targets[0, 2] == 0.5 and targets[2, 0] == 0.5
        want = itc_loss(img, txt, img_all, txt_all, model.temp, 0.0, targets)
    assert out["loss_itc"].item() == pytest.approx(want.item(), rel=1e-5)


def test_few_sgd_steps_lower_the_loss(tok):
    model = make_model(tok, seed=1).train()
    images, ids, mask = batch(tok, n=6, seed=1)
    ids, mask = tokenize(tok, CAPTIONS[:6], 16)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0
    )

    def eval_loss():
        model.eval()
        with torch.no_grad():
            out = model(images, ids, mask, alpha=0.0, generator=torch.Generator().manual_seed(0))
        model.train()
        return {k: v.item() for k, v in out.items()}

    before = eval_loss()
    for step in range(12):
        model.clamp_temp()
        out = model(images, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.momentum_update()
    after = eval_loss()
    assert after["loss"] < before["loss"] - 0.5
    assert after["loss_lm"] < before["loss_lm"] and after["loss_itm"] < before["loss_itm"] + 0.05


def test_gradient_checkpointing_same_gradients(tok):
    images, ids, mask = batch(tok)
    grads = []
    for ckpt in (False, True):
        model = make_model(tok, seed=3, grad_checkpointing=ckpt).train()
        out = model(images, ids, mask, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        if ckpt:
            assert (
                model.visual_encoder.grad_checkpointing
                and model.text_decoder.bert.encoder.layer[1].gradient_checkpointing
            )
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- folder


def test_model_folder_round_trip(tok, tmp_path):
    model = make_model(tok).train()
    images, ids, mask = batch(tok)
    model(
        images,
        ids,
        mask,
        image_ids=torch.tensor([5, 6, 7, 8]),
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        model.temp.fill_(0.05)
    cfg = model.cfg
    save_model_folder(tmp_path / "m", model, tok, cfg, stage="pretrain", extra={"step": 3})
    files = set(os.listdir(tmp_path / "m"))
    assert {WEIGHTS, CONFIG, META, "tokenizer.json"} <= files
    meta = json.loads((tmp_path / "m" / META).read_text())
    assert (
        meta["stage"] == "pretrain" and meta["format_version"] == 1 and meta["extra"] == {"step": 3}
    )

    loaded, tok2, cfg2, meta2 = load_model_folder(tmp_path / "m")
    assert cfg2 == cfg and meta2 == meta and special_ids(tok2) == special_ids(tok)
    assert not loaded.training
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # ties are back after loading
    assert (
        loaded.text_decoder.bert.encoder.layer[1].crossattention
        is loaded.text_encoder.encoder.layer[1].crossattention
    )
    assert (
        loaded.text_decoder.cls.predictions.decoder.weight
        is loaded.text_encoder.embeddings.word_embeddings.weight
    )
    assert (
        loaded.text_decoder.cls.predictions.bias is loaded.text_decoder.cls.predictions.decoder.bias
    )
    # the file's tensors become the model's parameters, trainable as the saved model's were
    params, params2 = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert params.keys() == params2.keys()
    assert all(params[k].requires_grad == params2[k].requires_grad for k in params)
    assert all(isinstance(p, torch.nn.Parameter) for p in params2.values())
    model.eval()
    with torch.no_grad():
        for fn in ("itm_logits", "lm_logits"):
            a = getattr(model, fn)(model.encode_image(images), ids, mask)
            b = getattr(loaded, fn)(loaded.encode_image(images), *tokenize(tok2, CAPTIONS[:4], 16))
            assert torch.equal(a, b)

    # without the momentum state: smaller, and the momentum weights restart from the online ones
    save_model_folder(tmp_path / "small", model, tok, cfg, stage="filter", include_momentum=False)
    assert (tmp_path / "small" / WEIGHTS).stat().st_size < (tmp_path / "m" / WEIGHTS).stat().st_size
    small, _, _, meta3 = load_model_folder(tmp_path / "small")
    assert meta3["stage"] == "filter" and not meta3["includes_momentum"]
    assert torch.equal(small.visual_encoder_m.pos_embed, model.visual_encoder.pos_embed)
    # and the queues are a new model's (the model was built without random weights to draw)
    assert int(small.queue_ptr) == 0 and (small.idx_queue == -1).all()
    for queue in (small.image_queue, small.text_queue):
        assert queue.shape == (16, 10)
        assert torch.allclose(queue.norm(dim=0), torch.ones(10))
    assert not torch.equal(small.image_queue, model.image_queue)  # the saved ones were left out
    with pytest.raises(ValueError, match="not a capfilt model folder"):
        load_model_folder(tmp_path)


def test_a_folder_whose_weights_are_half_precision_or_of_another_shape(tok, tmp_path):
    """The file's tensors are taken as they are where they fit: of another dtype they are
    converted to the model's, of another shape the folder is refused, naming the tensor."""
    from safetensors.torch import load_file, save_file

    model = make_model(tok)
    save_model_folder(tmp_path / "m", model, tok, model.cfg, stage="pretrain")
    weights = tmp_path / "m" / WEIGHTS
    tensors = load_file(str(weights))
    save_file(
        {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(weights)
    )
    loaded, *_ = load_model_folder(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    half = model.text_proj.weight.half().float()
    assert torch.equal(loaded.text_proj.weight, half)
    tensors["text_proj.weight"] = tensors["text_proj.weight"][:, :-1].contiguous()
    save_file(tensors, str(weights))
    with pytest.raises(
        ValueError, match=r"does not match.*text_proj.weight: \(16, 31\) in the weights"
    ):
        load_model_folder(tmp_path / "m")


def test_a_model_loaded_on_a_cpu_keeps_its_weights_when_the_file_is_rewritten_in_place(
    tok, tmp_path
):
    """safetensors reads through a mapping of the file, which would show a later rewrite of the
    file in place (``cp`` over it while a stage runs); on a CPU the model holds its own copy."""
    model = make_model(tok)
    save_model_folder(tmp_path / "m", model, tok, model.cfg, stage="pretrain")
    weights = tmp_path / "m" / WEIGHTS
    loaded, *_ = load_model_folder(tmp_path / "m")
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:  # same file, new bytes: what cp does
        fh.write(bytes(size))
    after = loaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_loaded_for_inference_leaves_its_training_state_behind(tok, tmp_path):
    """A stage's model has no momentum copies and no queues (nothing for its device to hold),
    and computes what the whole model computes."""
    from capfilt.model.med import is_training_state

    model = make_model(tok)
    save_model_folder(tmp_path / "m", model, tok, model.cfg, stage="pretrain")
    whole, *_ = load_model_folder(tmp_path / "m")
    lean, *_ = load_model_folder(tmp_path / "m", inference=True)
    sd, lean_sd = whole.state_dict(), lean.state_dict()
    assert lean_sd.keys() == {k for k in sd if not is_training_state(k)}
    assert all(torch.equal(v, sd[k]) for k, v in lean_sd.items())
    assert lean.visual_encoder_m is None and lean.image_queue is None
    size = sum(p.numel() for p in lean.parameters())
    assert size < 0.75 * sum(p.numel() for p in whole.parameters())
    images, ids, mask = batch(tok)
    with torch.no_grad():
        a, b = whole.encode_image(images), lean.encode_image(images)
        for fn in ("itm_logits", "lm_logits"):
            assert torch.equal(getattr(whole, fn)(a, ids, mask), getattr(lean, fn)(b, ids, mask))


def test_a_model_that_cannot_be_built_on_the_meta_device_still_loads(tok, tmp_path, monkeypatch):
    """Loading builds the model without drawing random weights (on the meta device); a library
    that reads a tensor's value while building cannot: the model is then built as usual."""
    import capfilt.model.build as build_mod

    model = make_model(tok)
    save_model_folder(tmp_path / "m", model, tok, model.cfg, stage="pretrain")
    build, builds = build_mod.build_model, []

    def reads_a_value(*args, **kwargs):
        on_meta = torch.empty(0).is_meta
        builds.append("meta" if on_meta else "cpu")
        if on_meta:
            torch.zeros(1).item()  # what an older timm's ViT does with its drop-path rates
        return build(*args, **kwargs)

    monkeypatch.setattr(build_mod, "build_model", reads_a_value)
    loaded, *_ = load_model_folder(tmp_path / "m")
    assert builds == ["meta", "cpu"]
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


HEAD_PARTS = (
    "temp",
    "itm_head.weight",
    "itm_head.bias",
    "vision_proj.weight",
    "vision_proj.bias",
    "text_decoder.cls.predictions.transform.dense.weight",
    "text_decoder.cls.predictions.transform.dense.bias",
    "text_decoder.cls.predictions.transform.LayerNorm.weight",
    "text_decoder.cls.predictions.transform.LayerNorm.bias",
    "text_decoder.cls.predictions.bias",
)


@pytest.mark.parametrize("weight_init", ["bert", "fan_in"])
def test_init_parts_gives_lacking_heads_a_new_models_initialisation(tok, weight_init):
    """An imported checkpoint's model is built unfilled; the heads the checkpoint lacks are then
    initialised alone, as the constructor initialises them, and nothing else is touched."""
    from capfilt.model.build import build_unfilled
    from capfilt.model.text import INIT_STD

    cfg = dataclasses.replace(
        make_model(tok).cfg,
        text_width=64,
        text_intermediate=128,
        embed_dim=64,
        weight_init=weight_init,
    )
    model = build_unfilled(cfg, tok)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # what uninitialised memory may hold
    torch.manual_seed(0)
    model.init_parts(HEAD_PARTS)
    p = dict(model.named_parameters(remove_duplicate=False))
    assert all(torch.isfinite(p[name]).all() for name in HEAD_PARTS)
    assert (
        torch.isnan(p["text_proj.weight"]).all()
        and torch.isnan(p["visual_encoder.cls_token"]).all()
    )
    assert p["temp"].item() == pytest.approx(cfg.temp)
    transform = "text_decoder.cls.predictions.transform."
    assert torch.equal(p[transform + "LayerNorm.weight"], torch.ones(64))
    for zero in (
        transform + "LayerNorm.bias",
        transform + "dense.bias",
        "text_decoder.cls.predictions.bias",
    ):
        assert not p[zero].any(), zero  # BERT's biases
    dense, itm = p[transform + "dense.weight"], p["itm_head.weight"]
    if weight_init == "bert":
        assert dense.std().item() == pytest.approx(INIT_STD, rel=0.1)
        bound = 64**-0.5  # a new nn.Linear's: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too
        assert itm.abs().max() <= bound and p["itm_head.bias"].abs().max() <= bound
        assert itm.std().item() == pytest.approx(bound / 3**0.5, rel=0.25)
    else:  # every linear weight re-drawn from N(0, 1/fan_in)
        assert dense.std().item() == pytest.approx(64**-0.5, rel=0.1)
        assert p["vision_proj.weight"].std().item() == pytest.approx(32**-0.5, rel=0.1)
    for part in ("visual_encoder.cls_token", "not_a_part.weight"):
        with pytest.raises(ValueError, match="no initialisation of its own|not parameters"):
            model.init_parts([part])


def test_safetensors_file_stores_shared_tensors_once(tok, tmp_path):
    from safetensors import safe_open

    model = make_model(tok)
    save_model_folder(tmp_path / "m", model, tok, model.cfg, stage="init")
    with safe_open(str(tmp_path / "m" / WEIGHTS), "pt") as fh:
        keys = set(fh.keys())
        aliases = json.loads(fh.metadata()["capfilt_aliases"])
    assert "text_encoder.embeddings.word_embeddings.weight" in keys
    assert "text_decoder.bert.embeddings.word_embeddings.weight" not in keys
    assert (
        aliases["text_decoder.cls.predictions.decoder.weight"]
        == "text_encoder.embeddings.word_embeddings.weight"
    )
    assert "text_decoder.bert.encoder.layer.0.attention.self.query.weight" in keys
    assert sum(fh_n for fh_n in [len(keys)]) + len(aliases) == len(model.state_dict())


# ---------------------------------------------------------------- pretrained initialisation


def test_init_from_vit_and_bert_checkpoints(tok, tmp_path):
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForMaskedLM

    from capfilt.model.vision import build_vit

    # a ViT trained at another resolution: the position embedding gets resampled
    torch.manual_seed(5)
    vit = build_vit(tiny_cfg(image_size=48), 0.0)
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    # a BERT with the tokenizer's vocabulary minus [DEC]/[ENC]
    tok.save_pretrained(tmp_path / "tok")
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tok) - 2,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    bert.save_pretrained(tmp_path / "bert")

    cfg = tiny_cfg(
        vision_checkpoint=str(tmp_path / "vit.safetensors"),
        text_checkpoint=str(tmp_path / "bert"),
        tokenizer=str(tmp_path / "tok"),
    )
    model = build_model(cfg, load_tokenizer(cfg.tokenizer))
    assert torch.equal(model.visual_encoder.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)
    assert model.visual_encoder.pos_embed.shape == (1, 17, 32) and vit.pos_embed.shape == (
        1,
        37,
        32,
    )
    b = bert.bert
    assert torch.equal(
        model.text_encoder.embeddings.word_embeddings.weight[: len(tok) - 2],
        b.embeddings.word_embeddings.weight,
    )
    for i in range(2):
        le, ld, lb = (
            model.text_encoder.encoder.layer[i],
            model.text_decoder.bert.encoder.layer[i],
            b.encoder.layer[i],
        )
        assert torch.equal(le.attention.self.query.weight, lb.attention.self.query.weight)
        assert torch.equal(ld.attention.self.query.weight, lb.attention.self.query.weight)
        assert torch.equal(le.output.dense.weight, lb.output.dense.weight)
    assert torch.equal(
        model.text_decoder.cls.predictions.transform.dense.weight,
        bert.cls.predictions.transform.dense.weight,
    )
    # momentum copies follow the loaded weights
    assert torch.equal(
        model.visual_encoder_m.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight
    )
    assert torch.equal(
        model.text_encoder_m.encoder.layer[0].attention.self.query.weight,
        b.encoder.layer[0].attention.self.query.weight,
    )


def test_parameter_counts(tok):
    counts = count_parameters(make_model(tok))
    assert counts["total"] == counts["trainable"] + counts["momentum"]
    assert 50_000 < counts["trainable"] < 200_000


# ---------------------------------------------------------------- distributed


def _dist_worker(rank: int, world: int, init_file: str, tok_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from capfilt.model import Gather, all_gather_with_grad, load_tokenizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        # all_gather_with_grad: exact gradient for the local part (sum over ranks' losses)
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        y = all_gather_with_grad(x)
        weight = torch.arange(12.0).view(4, 3) * (rank + 1)
        (y * weight).sum().backward()
        expected = sum(torch.arange(12.0).view(4, 3) * (r + 1) for r in range(world))[
            2 * rank : 2 * rank + 2
        ]
        assert torch.equal(x.grad, expected), (x.grad, expected)

        tok = load_tokenizer(tok_dir)
        model = make_model(tok).train()
        images, ids, mask = batch(tok, n=4)
        sl = slice(2 * rank, 2 * rank + 2)
        # local ids trimmed to their own longest length: ITM must pad across ranks
        local_len = int(mask[sl].sum(1).max())
        out = model(
            images[sl],
            ids[sl, :local_len],
            mask[sl, :local_len],
            image_ids=torch.tensor([0, 1, 2, 3])[sl],
            alpha=0.4,
            generator=torch.Generator().manual_seed(7),  # the same on every rank
        )
        out["loss"].backward()
        torch.save(
            {
                "itc": out["loss_itc"].item(),
                "lm": out["loss_lm"].item(),
                "itm": out["loss_itm"].item(),
                "queue": model.image_queue.clone(),
                "idx": model.idx_queue.clone(),
                "rank": Gather().rank,
            },
            os.path.join(out_dir, f"r{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_global_batch_under_two_processes(tok, tmp_path):
    """Two gloo ranks with 2 samples each == one process with the 4 samples (losses, queue)."""
    import torch.multiprocessing as mp

    tok.save_pretrained(tmp_path / "tok")
    # spawn, not fork: this process has run autograd (and maybe CUDA) already, whose worker threads
    # a forked child inherits broken
    ctx = mp.start_processes(
        _dist_worker,
        args=(2, str(tmp_path / "pg"), str(tmp_path / "tok"), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("distributed workers did not finish within 120 s")
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2))
    assert (r0["rank"], r1["rank"]) == (0, 1)

    model = make_model(tok).train()
    images, ids, mask = batch(tok, n=4)
    ref = model(
        images,
        ids,
        mask,
        image_ids=torch.tensor([0, 1, 2, 3]),
        alpha=0.4,
        gather=LocalGather(),
        generator=torch.Generator().manual_seed(7),
    )
    # ITC and ITM (same generator: the same hard negatives) are means over equal halves
    assert (r0["itc"] + r1["itc"]) / 2 == pytest.approx(ref["loss_itc"].item(), rel=1e-5)
    assert (r0["itm"] + r1["itm"]) / 2 == pytest.approx(ref["loss_itm"].item(), rel=1e-5)
    # LM is a per-rank token mean: compare with the halves computed in one process
    halves = [
        model.forward_pretrain(images[sl], ids[sl], mask[sl], weights=("lm",))
        for sl in (slice(0, 2), slice(2, 4))
    ]
    assert [r0["lm"], r1["lm"]] == pytest.approx([h["loss_lm"].item() for h in halves], rel=1e-5)
    # the queue holds the global batch on both ranks, in rank order
    assert torch.allclose(r0["queue"], model.image_queue, atol=1e-6)
    assert torch.equal(r0["queue"], r1["queue"])
    assert r0["idx"][0, :4].tolist() == [0, 1, 2, 3]
