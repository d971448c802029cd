"""Retrieval evaluation (docs/architecture.md §4): ITC top-k + ITM re-rank, recalls, chunking, rank split, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from capfilt.config import load_recipe
from capfilt.data.reader import read_samples
from capfilt.data.shards import expand_shards
from capfilt.data.synth import write_synth
from capfilt.data.text import clean_caption
from capfilt.data.transforms import EvalTransform
from capfilt.eval.retrieval import (
    METRIC_KEYS,
    Ranking,
    RetrievalFeatures,
    compute_features,
    evaluate_retrieval,
    recall_at_k,
    retrieval_scores,
    row_block,
    score_rows,
)
from capfilt.model import build_model, save_model_folder, tokenize, train_wordpiece_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP spinning makes them ~50x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("tiny")


@pytest.fixture(scope="module")
def test_dir(tmp_path_factory, recipe):
    root = tmp_path_factory.mktemp("synth")
    write_synth(root, dataclasses.replace(recipe.synth, n_human=0, n_web=0))
    return root / "test"


@pytest.fixture(scope="module")
def samples(test_dir):
    return list(read_samples(expand_shards([str(test_dir)])))


@pytest.fixture(scope="module")
def model_and_tok(samples, recipe):
    tok = train_wordpiece_tokenizer(
        [c["text"] for s in samples for c in s.captions], recipe.model.vocab_size
    )
    torch.manual_seed(0)
    model = build_model(recipe.model, tok).eval()  # random weights: enough for equality tests
    return model, tok


@pytest.fixture(scope="module")
def feats8(model_and_tok, samples):
    model, tok = model_and_tok
    return compute_features(
        model, tok, samples[:8], batch_size=3
    )  # odd batch size: partial batches on both sides


# --------------------------------------------------------------------------- features
def test_features_cover_every_caption(feats8, samples):
    assert feats8.n_images == 8
    assert feats8.n_texts == sum(len(s.captions) for s in samples[:8]) == 40
    assert feats8.img2txt[0] == [0, 1, 2, 3, 4]
    assert feats8.txt2img.tolist()[5:10] == [1] * 5
    assert feats8.texts[0] == clean_caption(samples[0].captions[0]["text"], 30)
    assert feats8.image_keys == [s.key for s in samples[:8]]
    assert torch.allclose(feats8.image_feat.norm(dim=1), torch.ones(8), atol=1e-5)
    assert feats8.image_embeds.shape[0] == 8 and feats8.text_ids.shape == feats8.text_mask.shape


def test_features_from_shards_equal_with_loader_workers(model_and_tok, samples, test_dir):
    model, tok = model_and_tok
    ref = compute_features(model, tok, samples, batch_size=7)
    for workers in (0, 2):
        got = compute_features(model, tok, str(test_dir), batch_size=7, num_workers=workers)
        assert got.image_keys == ref.image_keys and got.texts == ref.texts
        assert torch.equal(got.image_embeds, ref.image_embeds)
        assert torch.equal(got.image_feat, ref.image_feat)


# --------------------------------------------------------------------------- exhaustive == brute force
@torch.inference_mode()
def brute_force_scores(model, tok, samples, score="blip") -> tuple[torch.Tensor, list[int]]:
    """ITM logit + cosine of every (image, text) pair, one pair per forward pass, nothing shared;
    ``log_odds``: (match − no-match logit) + cosine / temperature; ``log_prob``: log p(match) by
    hand + cosine / temperature."""
    transform = EvalTransform(model.cfg.image_size)
    images, texts, txt2img = [], [], []
    for i, s in enumerate(samples):
        embeds = model.encode_image(transform(s.image.convert("RGB")).unsqueeze(0))
        images.append((embeds, model.image_features(embeds)))
        for c in s.captions:
            ids, mask = tokenize(tok, [clean_caption(c["text"], 30)], model.cfg.max_text_len)
            texts.append((ids, mask, model.encode_text_features(ids, mask)))
            txt2img.append(i)
    scores = torch.empty(len(images), len(texts))
    for i, (embeds, ifeat) in enumerate(images):
        for j, (ids, mask, tfeat) in enumerate(texts):
            logits = model.itm_logits(embeds, ids, mask)[0]
            cos = (ifeat @ tfeat.t())[0, 0]
            if score == "log_odds":
                scores[i, j] = logits[1] - logits[0] + cos / model.temp
            elif score == "log_prob":
                p_match = logits[1].exp() / (logits[0].exp() + logits[1].exp())
                scores[i, j] = p_match.log() + cos / model.temp
            else:
                scores[i, j] = logits[1] + cos
    return scores, txt2img


def test_exhaustive_equals_brute_force(model_and_tok, samples, feats8):
    model, tok = model_and_tok
    ref, txt2img = brute_force_scores(model, tok, samples[:8])
    scores = retrieval_scores(model, feats8, k=10_000, batch_size=7, full=True)
    assert scores.itm_pairs == 8 * 40  # each pair scored once although both directions ask for it
    s_i2t, s_t2i = scores.dense()
    assert (s_i2t - ref).abs().max() < 1e-5
    assert (s_t2i - ref.t()).abs().max() < 1e-5
    assert recall_at_k(scores.i2t, scores.t2i, feats8.txt2img) == recall_at_k(ref, ref.t(), txt2img)
    assert recall_at_k(s_i2t, s_t2i, txt2img) == recall_at_k(ref, ref.t(), txt2img)


@pytest.mark.parametrize("score", ["log_odds", "log_prob"])
def test_log_probability_scores_equal_brute_force(model_and_tok, samples, feats8, score):
    model, tok = model_and_tok
    ref, txt2img = brute_force_scores(model, tok, samples[:8], score=score)
    blip, _ = brute_force_scores(model, tok, samples[:8])
    assert (ref - blip).abs().max() > 1e-2  # the scores differ on this model
    scores = retrieval_scores(model, feats8, k=10_000, batch_size=7, full=True, rerank_score=score)
    s_i2t, s_t2i = scores.dense()
    assert (s_i2t - ref).abs().max() < 1e-4
    assert (s_t2i - ref.t()).abs().max() < 1e-4
    assert recall_at_k(scores.i2t, scores.t2i, feats8.txt2img) == recall_at_k(ref, ref.t(), txt2img)
    with pytest.raises(ValueError, match="rerank_score"):
        retrieval_scores(model, feats8, k=2, rerank_score="itm_only")


# --------------------------------------------------------------------------- ITC only
def hand_features() -> RetrievalFeatures:
    """3 images x 2 captions; image features are the basis vectors, so S = text_feat.T (hand-picked)."""
    s = torch.tensor(
        [
            #  t0   t1   t2   t3   t4   t5      t0,t1 -> img0; t2,t3 -> img1; t4,t5 -> img2
            [
                0.1,
                0.9,
                0.5,
                0.3,
                0.2,
                0.0,
            ],  # img0: t1 first (t0 only 5th): any caption counts, R@1 hit
            [0.8, 0.7, 0.6, 0.1, 0.5, 0.4],  # img1: best own text t2 at rank 3: R@1 miss, R@5 hit
            [0.9, 0.8, 0.7, 0.6, 0.3, 0.35],  # img2: best own text t5 at rank 5: R@1 miss, R@5 hit
        ]
    )
    return RetrievalFeatures(
        image_feat=torch.eye(3),
        text_feat=s.t().contiguous(),
        txt2img=torch.tensor([0, 0, 1, 1, 2, 2]),
    )


def test_hand_made_recalls():
    feats = hand_features()
    scores = retrieval_scores(None, feats, k=0)
    got = recall_at_k(scores.i2t, scores.t2i, feats.txt2img)
    # IR: t0 ranks img0 3rd, t1 1st, t2 2nd, t3 3rd, t4 2nd, t5 2nd -> only t1 at R@1
    expected = {
        "tr_r1": 100 / 3,
        "tr_r5": 100.0,
        "tr_r10": 100.0,
        "ir_r1": 100 / 6,
        "ir_r5": 100.0,
        "ir_r10": 100.0,
    }
    expected["tr_mean"] = (100 / 3 + 200) / 3
    expected["ir_mean"] = (100 / 6 + 200) / 3
    expected["r_mean"] = (expected["tr_mean"] + expected["ir_mean"]) / 2
    assert list(got) == list(METRIC_KEYS)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    # written to JSON as the fraction it is (float32's 33.33333432674408 looked like a bug)
    assert (got["tr_r1"], got["ir_r1"]) == (100 / 3, 100 / 6)


def reference_recalls(s: torch.Tensor, txt2img: list[int]) -> dict[str, float]:
    """Plain-Python recalls from a dense cosine matrix (ranks by sorted lists)."""
    n_img, n_txt = s.shape
    out = {}
    tr_ranks = []
    for i in range(n_img):
        order = sorted(range(n_txt), key=lambda j: -float(s[i, j]))
        tr_ranks.append(min(order.index(j) for j in range(n_txt) if txt2img[j] == i))
    ir_ranks = []
    for j in range(n_txt):
        order = sorted(range(n_img), key=lambda i: -float(s[i, j]))
        ir_ranks.append(order.index(txt2img[j]))
    for name, ranks in (("tr", tr_ranks), ("ir", ir_ranks)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    return out


def test_k0_is_cosine_ranking():
    g = torch.Generator().manual_seed(1)
    n_img, per = 30, 3
    image_feat = torch.nn.functional.normalize(torch.randn(n_img, 8, generator=g), dim=1)
    txt2img = [i for i in range(n_img) for _ in range(per)]
    # captions near their image, so recalls are neither 0 nor 100
    text_feat = torch.nn.functional.normalize(
        image_feat[txt2img] + 0.9 * torch.randn(n_img * per, 8, generator=g), dim=1
    )
    feats = RetrievalFeatures(
        image_feat=image_feat, text_feat=text_feat, txt2img=torch.tensor(txt2img)
    )
    s = image_feat @ text_feat.t()

    full = retrieval_scores(None, feats, k=0, full=True)
    assert torch.allclose(full.i2t.dense(), s, atol=1e-6)
    assert torch.allclose(full.t2i.dense(), s.t(), atol=1e-6)
    head = retrieval_scores(None, feats, k=0)  # only the top 10 per query kept
    assert head.i2t.indices.shape == (n_img, 10)
    got = recall_at_k(head.i2t, head.t2i, feats.txt2img)
    assert got == recall_at_k(s, s.t(), txt2img) == recall_at_k(full.i2t, full.t2i, txt2img)
    ref = reference_recalls(s, txt2img)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value), key
    assert 0 < got["tr_r1"] < got["tr_r10"] < 100 and 0 < got["ir_r1"] < got["ir_r10"] < 100


def test_dense_ranking_roundtrip_and_blip_fill():
    s = torch.tensor([[0.2, 0.9, 0.5], [0.7, 0.1, 0.3]])
    r = Ranking.from_dense(s)
    assert r.indices.tolist() == [[1, 2, 0], [0, 2, 1]]
    assert torch.equal(r.dense(), s)
    head = Ranking(indices=r.indices[:, :2], scores=r.scores[:, :2], n_candidates=3, k=1)
    assert head.dense().tolist() == [
        [-100.0, pytest.approx(0.9), -100.0],
        [pytest.approx(0.7), -100.0, -100.0],
    ]
    with pytest.raises(ValueError):
        Ranking(indices=r.indices[:, :2], scores=r.scores[:, :2], n_candidates=3, k=0).dense()


# --------------------------------------------------------------------------- chunks, heads, rank split
def test_chunked_equals_unchunked(model_and_tok, feats8):
    model, _ = model_and_tok
    whole = retrieval_scores(model, feats8, k=4, chunk_size=10_000)
    chunked = retrieval_scores(model, feats8, k=4, chunk_size=3)
    for a, b in ((whole.i2t, chunked.i2t), (whole.t2i, chunked.t2i)):
        assert torch.equal(a.indices, b.indices)
        assert torch.allclose(a.scores, b.scores, atol=1e-6)


def test_small_k_reranks_head_and_matches_blip_fill(model_and_tok, feats8):
    model, _ = model_and_tok
    cosine = retrieval_scores(None, feats8, k=0, full=True)
    for k in (3, 12):
        scores = retrieval_scores(model, feats8, k=k, full=True)
        # the re-ranked head is the cosine top-k as a set; the tail keeps cosine order
        k_i2t = min(k, feats8.n_texts)
        for q in range(feats8.n_images):
            assert set(scores.i2t.indices[q, :k_i2t].tolist()) == set(
                cosine.i2t.indices[q, :k_i2t].tolist()
            )
        assert torch.equal(scores.i2t.indices[:, k_i2t:10], cosine.i2t.indices[:, k_i2t:10])
        head = retrieval_scores(model, feats8, k=k)
        # the cosine ranking the re-rank started from rides along: the k = 0 ranking's head
        for itc, ref in ((head.itc_i2t, cosine.i2t), (head.itc_t2i, cosine.t2i)):
            m = itc.indices.shape[1]
            assert itc.k == 0 and torch.equal(itc.indices, ref.indices[:, :m])
            assert torch.allclose(itc.scores, ref.scores[:, :m])
        metrics = recall_at_k(head.i2t, head.t2i, feats8.txt2img)
        assert metrics == recall_at_k(scores.i2t, scores.t2i, feats8.txt2img)
        if k >= 10:  # BLIP's −100-filled matrices give the same R@1/5/10 once k covers the top 10
            assert metrics == recall_at_k(*scores.dense(), feats8.txt2img)


def test_rank_blocks_reassemble(model_and_tok, feats8):
    model, _ = model_and_tok
    single = score_rows(model, feats8, 4, range(feats8.n_images), range(feats8.n_texts))
    for world in (2, 3, 16):
        parts = [
            score_rows(
                model,
                feats8,
                4,
                row_block(feats8.n_images, r, world),
                row_block(feats8.n_texts, r, world),
            )
            for r in range(world)
        ]
        for direction in ("i2t", "t2i"):
            indices = torch.cat([getattr(p, direction).indices for p in parts])
            scores = torch.cat([getattr(p, direction).scores for p in parts])
            assert torch.equal(indices, getattr(single, direction).indices)
            assert torch.allclose(scores, getattr(single, direction).scores, atol=1e-6)
    assert [len(row_block(5, r, 4)) for r in range(4)] == [2, 2, 1, 0]


def test_evaluate_retrieval_with_model_object(model_and_tok, samples):
    model, tok = model_and_tok
    result = evaluate_retrieval(model, samples[:6], k=2, batch_size=4, tokenizer=tok)
    assert set(METRIC_KEYS) <= set(result)
    assert (result["n_images"], result["n_texts"], result["k"]) == (6, 30, 2)
    assert result["seconds"] >= 0 and result["rerank_score"] == "blip"
    # the ITC ranking of the same features rides along: what the re-rank adds is the difference
    feats = compute_features(model, tok, samples[:6], batch_size=4)
    itc = retrieval_scores(None, feats, k=0)
    assert result["itc"] == recall_at_k(itc.i2t, itc.t2i, feats.txt2img)
    assert "itc" not in evaluate_retrieval(model, samples[:6], k=0, batch_size=4, tokenizer=tok)
    with pytest.raises(ValueError):
        evaluate_retrieval(model, samples[:2], k=-1, tokenizer=tok)


# --------------------------------------------------------------------------- CLI
def test_cli_writes_json(tmp_path, model_and_tok, test_dir, recipe):
    from capfilt.cli.eval_cmds import app  # the `capfilt eval` group

    model, tok = model_and_tok
    folder = save_model_folder(
        tmp_path / "model", model, tok, recipe.model, stage="pretrain", include_momentum=False
    )
    runner = CliRunner()
    out = tmp_path / "res" / "retrieval.json"
    result = runner.invoke(
        app,
        ["retrieval", "tiny", "--model", str(folder), "--shards", str(test_dir), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(METRIC_KEYS) <= set(data)
    assert data["n_images"] == 32 and data["n_texts"] == 160 and data["k"] == recipe.eval.k
    assert str(out) in result.output.replace("\n", "")

    k0 = runner.invoke(
        app, ["retrieval", "tiny", "--model", str(folder), "--shards", str(test_dir), "--k", "0"]
    )
    assert k0.exit_code == 0, k0.output
    assert "R@10" in k0.output

    bad = runner.invoke(
        app, ["retrieval", "tiny", "--model", str(folder), "--shards", str(tmp_path / "nope")]
    )
    assert bad.exit_code == 2
    bad_model = runner.invoke(
        app, ["retrieval", "tiny", "--model", str(tmp_path / "nomodel"), "--shards", str(test_dir)]
    )
    assert bad_model.exit_code == 2
