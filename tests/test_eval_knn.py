"""Weighted k-NN (DINO): exact on separated clusters, a vote worked out by hand, streaming equals
the brute-force oracle, input checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from fdistill.eval.knn import knn_classify, knn_scores, topk_accuracy


def test_well_separated_clusters_are_classified_exactly():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:4] * 10.0  # 4 orthogonal directions
    train = torch.cat([c + 0.3 * torch.randn(25, 8, generator=g) for c in centres])
    labels = torch.arange(4).repeat_interleave(25)
    test = torch.cat([c + 0.3 * torch.randn(10, 8, generator=g) for c in centres])
    truth = torch.arange(4).repeat_interleave(10)
    pred = knn_classify(train, labels, test, k=20, T=0.07, num_classes=4)
    assert torch.equal(pred, truth)
    assert topk_accuracy(knn_scores(train, labels, test, k=20, num_classes=4), truth) == {"top1": 100.0}


def test_weighted_vote_by_hand():
    # unit vectors at angles 0, 10, 20, 90 degrees; the query at 5 degrees
    ang = torch.tensor([0.0, 10.0, 20.0, 90.0]) * math.pi / 180
    train = torch.stack([ang.cos(), ang.sin()], 1)
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[math.cos(math.radians(5)), math.sin(math.radians(5))]])
    T = 0.1
    s = knn_scores(train, labels, q, k=3, T=T, num_classes=3)
    # neighbours: 0 deg (cos 5), 10 deg (cos 5), 20 deg (cos 15); the 90 deg sample is the 4th
    w5, w15 = math.exp(math.cos(math.radians(5)) / T), math.exp(math.cos(math.radians(15)) / T)
    assert s[0, 0].item() == pytest.approx(w5, rel=1e-5)
    assert s[0, 1].item() == pytest.approx(w5 + w15, rel=1e-5)
    assert s[0, 2].item() == 0.0
    # k=1: only the nearest votes (a tie between 0 and 10 degrees, both at distance 5)
    s1 = knn_scores(train, labels, q, k=1, T=T, num_classes=3)
    assert s1.sum().item() == pytest.approx(w5, rel=1e-5) and s1[0, 2] == 0
    # cosine ignores the scale of the features
    assert torch.allclose(knn_scores(train * 7, labels, q * 0.1, k=3, T=T, num_classes=3), s)


def _brute_force(train, labels, test, k, T, C):
    sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T  # (M, N): the oracle holds it all
    v, i = sim.topk(k, dim=1)
    out = torch.zeros(test.shape[0], C)
    out.scatter_add_(1, labels[i], (v / T).exp())
    return out


def test_streaming_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(503, 16, generator=g), torch.randn(77, 16, generator=g)
    labels = torch.randint(0, 7, (503,), generator=g)
    ref = _brute_force(train, labels, test, 20, 0.07, 7)
    got = knn_scores(train, labels, test, k=20, T=0.07, num_classes=7, test_batch=13, train_chunk=41)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    # chunks smaller than k still merge into the right top-k
    got = knn_scores(train, labels, test, k=20, T=0.07, num_classes=7, test_batch=64, train_chunk=7)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_k_larger_than_train_set_and_bad_input():
    train, labels = torch.randn(3, 4), torch.tensor([0, 1, 1])
    s = knn_scores(train, labels, torch.randn(2, 4), k=20, num_classes=2)
    assert s.shape == (2, 2) and (s > 0).sum(dim=1).tolist() == [2, 2]  # all 3 voted
    with pytest.raises(ValueError, match="dims"):
        knn_scores(train, labels, torch.randn(2, 5))
    with pytest.raises(ValueError, match="label < 0"):
        knn_scores(train, torch.tensor([0, -1, 1]), torch.randn(2, 4))
    with pytest.raises(ValueError, match="num_classes"):
        knn_scores(train, labels, torch.randn(2, 4), num_classes=1)
    with pytest.raises(ValueError, match="T must be > 0"):
        knn_scores(train, labels, torch.randn(2, 4), T=0)


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.0, 0.3],
                           [0.9, 0.0, 0.0, 0.0, 0.0, 0.1],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    labels = torch.tensor([1, 5, 0])
    acc = topk_accuracy(scores, labels)
    assert acc["top1"] == pytest.approx(100 / 3)  # only the first is right
    assert acc["top5"] == pytest.approx(200 / 3)  # the third's label 0 is ranked last
