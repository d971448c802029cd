"""The docs/architecture.md §2 losses against independent hand computations on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from capfilt.model.losses import (
    itc_loss,
    itc_targets,
    itm_loss,
    lm_labels,
    lm_loss,
    sample_itm_negatives,
)


def _log_softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _softmax_row(row: list[float]) -> list[float]:
    return [math.exp(v) for v in _log_softmax_row(row)]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _ref_itc(img, txt, img_m, txt_m, img_all, txt_all, temp, alpha, targets) -> float:
    """Explicit loops over rows and columns, plain python floats."""
    total = 0.0
    for feats, feats_m, other_all in ((img, img_m, txt_all), (txt, txt_m, img_all)):
        direction = 0.0
        for i in range(len(feats)):
            sim = [_dot(feats[i], other_all[j]) / temp for j in range(len(other_all))]
            sim_m = [_dot(feats_m[i], other_all[j]) / temp for j in range(len(other_all))]
            soft = _softmax_row(sim_m)
            logp = _log_softmax_row(sim)
            tgt = [alpha * soft[j] + (1 - alpha) * targets[i][j] for j in range(len(other_all))]
            direction += -sum(t * lp for t, lp in zip(tgt, logp, strict=True))
        total += direction / len(feats)
    return total / 2


def _feats(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_loss_matches_hand_computation(alpha):
    b, k, d, temp = 3, 7, 5, 0.07
    img, txt = _feats(b, d, 1), _feats(b, d, 2)
    img_m, txt_m = _feats(b, d, 3), _feats(b, d, 4)
    # global batch (momentum) followed by a queue of 4 entries
    img_all = torch.cat([img_m, _feats(k - b, d, 5)])
    txt_all = torch.cat([txt_m, _feats(k - b, d, 6)])
    targets = torch.zeros(b, k, dtype=torch.float64)
    targets[torch.arange(b), torch.arange(b)] = 1
    got = itc_loss(
        img, txt, img_all, txt_all, temp, alpha, targets, image_feat_m=img_m, text_feat_m=txt_m
    )
    want = _ref_itc(
        img.tolist(),
        txt.tolist(),
        img_m.tolist(),
        txt_m.tolist(),
        img_all.tolist(),
        txt_all.tolist(),
        temp,
        alpha,
        targets.tolist(),
    )
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_itc_loss_with_shared_image_targets_and_gradient():
    b, d, temp, alpha = 4, 6, 0.1, 0.3
    img = _feats(b, d, 7).float().requires_grad_(True)
    txt = _feats(b, d, 8).float().requires_grad_(True)
    img_m, txt_m = _feats(b, d, 9).float(), _feats(b, d, 10).float()
    ids = torch.tensor([5, 6, 5, 7])
    queue_ids = torch.tensor([6, -1])
    targets = itc_targets(ids, torch.cat([ids, queue_ids]))
    # row 0 (id 5): columns 0 and 2; row 1 (id 6): column 1 and the queue's first entry
    assert targets[0].tolist() == [0.5, 0, 0.5, 0, 0, 0]
    assert targets[1].tolist() == [0, 0.5, 0, 0, 0.5, 0]
    assert targets[3].tolist() == [0, 0, 0, 1, 0, 0]
    img_all = torch.cat([img_m, _feats(2, d, 11).float()])
    txt_all = torch.cat([txt_m, _feats(2, d, 12).float()])
    got = itc_loss(
        img, txt, img_all, txt_all, temp, alpha, targets, image_feat_m=img_m, text_feat_m=txt_m
    )
    want = _ref_itc(
        img.tolist(),
        txt.tolist(),
        img_m.tolist(),
        txt_m.tolist(),
        img_all.tolist(),
        txt_all.tolist(),
        temp,
        alpha,
        targets.tolist(),
    )
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert img.grad is not None and txt.grad is not None and torch.isfinite(img.grad).all()


def test_itc_loss_needs_momentum_features_for_alpha():
    x = _feats(2, 3, 0)
    with pytest.raises(ValueError, match="momentum"):
        itc_loss(x, x, x, x, 0.07, 0.4, torch.eye(2, dtype=torch.float64))


def test_itm_loss_hand_computation():
    pos = torch.tensor([[0.2, 1.0], [-0.5, 0.3]])
    neg = torch.tensor([[1.5, -1.0], [0.0, 0.0], [0.3, 0.9], [2.0, 1.0]])
    want = 0.0
    for row, label in [(r, 1) for r in pos.tolist()] + [(r, 0) for r in neg.tolist()]:
        want += -_log_softmax_row(row)[label]
    want /= 6
    assert itm_loss(pos, neg).item() == pytest.approx(want, rel=1e-6)


def test_lm_labels_mask_padding_and_prompt():
    ids = torch.tensor([[9, 5, 6, 7, 3], [9, 5, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert lm_labels(ids, mask).tolist() == [[9, 5, 6, 7, 3], [9, 5, 3, -100, -100]]
    assert lm_labels(ids, mask, prompt_len=2).tolist() == [
        [-100, -100, 6, 7, 3],
        [-100, -100, 3, -100, -100],
    ]
    assert ids[1, 3] == 0  # the input is not modified


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_lm_loss_label_smoothing_and_ignore(eps):
    g = torch.Generator().manual_seed(0)
    v = 5
    logits = torch.randn(2, 4, v, generator=g, dtype=torch.float64)
    labels = torch.tensor([[9, 1, 2, -100], [9, 4, -100, -100]])
    total, count = 0.0, 0
    for bi in range(2):
        for t in range(3):  # position t predicts label t+1
            y = int(labels[bi, t + 1])
            if y == -100:
                continue
            logp = _log_softmax_row(logits[bi, t].tolist())
            total += (1 - eps) * -logp[y] + eps * sum(-lp for lp in logp) / v
            count += 1
    assert count == 3
    assert lm_loss(logits, labels, label_smoothing=eps).item() == pytest.approx(
        total / count, rel=1e-6
    )


def test_lm_loss_default_smoothing_and_all_ignored():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    labels = torch.tensor([[1, 2, 3]])
    assert lm_loss(logits, labels).item() == pytest.approx(lm_loss(logits, labels, 0.1).item())
    assert lm_loss(logits, labels).item() != pytest.approx(lm_loss(logits, labels, 0.0).item())
    empty = lm_loss(logits, torch.full((1, 3), -100))
    assert empty.item() == 0.0
    empty.backward()  # still part of the graph


def _expected_probs(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    w = (sim.softmax(1) + 1e-4).masked_fill(same, 0)
    return w / w.sum(1, keepdim=True)


def test_negative_sampler_excludes_same_image_and_follows_softmax():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 3, 3])
    sim_i2t = torch.randn(6, 6, generator=g) * 2
    sim_t2i = torch.randn(6, 6, generator=g) * 2
    same = ids[:, None] == ids[None, :]
    draws = 4000
    counts_img, counts_txt = torch.zeros(6, 6), torch.zeros(6, 6)
    rows = torch.arange(6)
    for _ in range(draws):
        neg_img, neg_txt = sample_itm_negatives(sim_i2t, sim_t2i, ids, generator=g)
        assert not same[rows, neg_img].any() and not same[rows, neg_txt].any()
        counts_img[rows, neg_img] += 1
        counts_txt[rows, neg_txt] += 1
    # negative image for text i follows softmax(sim_t2i[i]); negative text for image i softmax(sim_i2t[i])
    assert torch.allclose(counts_img / draws, _expected_probs(sim_t2i, same), atol=0.035)
    assert torch.allclose(counts_txt / draws, _expected_probs(sim_i2t, same), atol=0.035)


def test_negative_sampler_never_draws_a_dominant_positive():
    ids = torch.tensor([10, 11, 12, 13, 14])
    sim = torch.zeros(5, 5)
    sim[3, 3] = sim[4, 4] = 50.0  # the positives dominate the softmax but must never be drawn
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        for neg in sample_itm_negatives(sim, sim, ids, generator=g):
            assert neg[3] != 3 and neg[4] != 4
            assert neg.min() >= 0 and neg.max() < 5
    with pytest.raises(ValueError, match="shape mismatch"):
        sample_itm_negatives(sim[:2], sim[:2], ids)


def test_negative_sampler_without_negatives_raises_clearly():
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        sample_itm_negatives(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0]))
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        sample_itm_negatives(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([4, 4, 4]))


def test_host_check_of_image_ids_used_under_compile():
    from capfilt.model.med import check_image_ids

    check_image_ids(torch.tensor([4, 4, 4]))  # one image is fine without ITM
    check_image_ids(torch.tensor([4, 5, 4]), distinct=True)
    with pytest.raises(ValueError, match="batch of 3 with 1 distinct image ids"):
        check_image_ids(torch.tensor([4, 4, 4]), distinct=True)
    with pytest.raises(ValueError, match=">= 0"):
        check_image_ids(torch.tensor([0, -1]), distinct=True)


@pytest.mark.parametrize("mode", ["hard", "random", "mixed"])
def test_negative_sampler_never_draws_the_positive_in_any_mode(mode):
    ids = torch.tensor([10, 10, 11, 12, 13, 14])  # rows 0 and 1 share an image
    sim = torch.zeros(6, 6)
    sim[torch.arange(6), torch.arange(6)] = 50.0  # positives dominate the softmax
    sim[0, 1] = sim[1, 0] = 50.0
    same = ids[:, None] == ids[None, :]
    rows = torch.arange(6)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        for neg in sample_itm_negatives(sim, sim, ids, generator=g, mode=mode):
            assert not same[rows, neg].any()


def test_random_negatives_are_uniform_over_the_other_images():
    # rows 0 and 1 share an image: 4 candidates each; the others 5. Similarities must not matter.
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=g) * 10
    draws = 6000
    counts = torch.zeros(6, 6)
    rows = torch.arange(6)
    for _ in range(draws):
        neg_img, neg_txt = sample_itm_negatives(sim, -sim, ids, generator=g, mode="random")
        counts[rows, neg_img] += 1
        counts[rows, neg_txt] += 1
    n = 2 * draws
    valid = ids[:, None] != ids[None, :]
    p = valid.float() / valid.sum(1, keepdim=True)
    assert (counts[~valid] == 0).all()
    # each count is Binomial(n, p): 5 standard deviations (a false alarm about 1 in 10^6 per cell)
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sd + 1e-6).all(), counts / n
    # and the sampler is not merely close but uniform: a softmax of sim * 10 would be far off
    assert ((counts[valid] / n) - p[valid]).abs().max() < 0.02


def test_hard_negatives_are_blips_draw_for_a_fixed_seed():
    """``hard`` (the default) draws exactly BLIP's softmax(sim) + 1e-4 from the generator's stream."""
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    sim_i2t = torch.randn(8, 8, generator=g) * 3
    sim_t2i = torch.randn(8, 8, generator=g) * 3
    same = ids[:, None] == ids[None, :]
    ref = torch.Generator().manual_seed(7)
    want_img = torch.multinomial(
        (sim_t2i.softmax(1) + 1e-4).masked_fill(same, 0), 1, generator=ref
    ).squeeze(1)
    want_txt = torch.multinomial(
        (sim_i2t.softmax(1) + 1e-4).masked_fill(same, 0), 1, generator=ref
    ).squeeze(1)
    for kwargs in ({}, {"mode": "hard"}):
        got = sample_itm_negatives(
            sim_i2t, sim_t2i, ids, generator=torch.Generator().manual_seed(7), **kwargs
        )
        assert torch.equal(got[0], want_img) and torch.equal(got[1], want_txt)


def test_mixed_negatives_are_hard_on_even_rows_and_uniform_on_odd_rows():
    ids = torch.arange(6)
    sim = torch.full((6, 6), -50.0)
    sim[:, 5] = 50.0  # column 5 takes all the softmax mass of every other row
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6, 6)
    rows = torch.arange(6)
    for _ in range(2000):
        for neg in sample_itm_negatives(sim, sim, ids, generator=g, mode="mixed"):
            counts[rows, neg] += 1
    # hard rows: the confusable column but for BLIP's 1e-4 floor (4 others x 1e-4 per draw)
    assert (counts[[0, 2, 4], 5] >= 3980).all()
    # random rows: 5 candidates each, 4000 draws; Binomial(4000, 0.2) has sd 25.3
    odd = counts[[1, 3]]
    off_diag = odd[odd > 0]
    assert off_diag.numel() == 10 and ((off_diag - 800).abs() < 130).all()


def test_negative_sampler_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        sample_itm_negatives(
            torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 1]), mode="soft"
        )
