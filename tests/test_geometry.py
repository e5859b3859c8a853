"""fused_cosloss.geometry against direct computations."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fused_cosloss import geometry


def direct_mean_pairwise_cosine(rows):
    values = [float(F.cosine_similarity(rows[i].double(), rows[j].double(), dim=0, eps=1e-12))
              for i, j in itertools.permutations(range(rows.shape[0]), 2)]
    return sum(values) / len(values)


@pytest.mark.parametrize("n, hidden", [(2, 3), (7, 5), (30, 16)])
def test_mean_pairwise_cosine_is_the_mean_over_pairs(gen, n, hidden):
    rows = torch.randn(n, hidden, generator=gen) + torch.randn(hidden, generator=gen)  # a shared direction
    assert geometry.mean_pairwise_cosine(rows) == pytest.approx(direct_mean_pairwise_cosine(rows), abs=1e-12)


def test_mean_pairwise_cosine_of_one_direction_is_one_and_of_opposites_minus_one():
    direction = torch.tensor([1.0, 2.0, -0.5])
    assert geometry.mean_pairwise_cosine(torch.stack([direction * s for s in (1, 2, 3)])) == pytest.approx(1.0)
    assert geometry.mean_pairwise_cosine(torch.stack([direction, -direction])) == pytest.approx(-1.0)
    assert math.isnan(geometry.mean_pairwise_cosine(direction[None]))


def test_effective_rank_against_singular_values(gen):
    rows = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(rows)
    p = s / s.sum()
    assert geometry.effective_rank(rows) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-12)
    assert geometry.effective_rank(torch.eye(6)) == pytest.approx(6.0)
    assert geometry.effective_rank(torch.outer(torch.arange(1.0, 9.0), torch.randn(5, generator=gen))) == pytest.approx(1.0)
    assert math.isnan(geometry.effective_rank(torch.zeros(3, 4)))


def test_relative_change_and_the_seen_split(gen):
    before = torch.randn(10, 4, generator=gen)
    after = before.clone()
    after[3] += 1.0
    assert geometry.relative_change(before, after) == pytest.approx(2.0 / before.double().norm().item())
    groups = geometry.split_by_seen(10, torch.tensor([[3, 3, -100], [7, 0, 12]]))
    assert groups["seen"].tolist() == [0, 3, 7]
    assert groups["unseen"].tolist() == [1, 2, 4, 5, 6, 8, 9]


def test_embedding_geometry_samples_the_same_rows_each_time(gen):
    table = torch.randn(500, 8, generator=gen)
    groups = geometry.split_by_seen(500, torch.arange(0, 500, 3))
    moved = table.clone()
    moved[groups["seen"]] *= 1.5  # seen rows scaled by 1.5: relative change 0.5, cosines unchanged
    report = geometry.embedding_geometry(moved, groups, before=table, size=64, seed=1)
    assert report == geometry.embedding_geometry(moved, groups, before=table, size=64, seed=1)
    assert report["seen"]["sample"] == 64 and report["seen"]["tokens"] == 167
    assert report["seen"]["relative_change"] == pytest.approx(0.5)
    assert report["unseen"]["relative_change"] == 0.0
    sample = geometry.token_sample(groups["unseen"], 64, 1)
    assert report["unseen"]["mean_pairwise_cosine"] == pytest.approx(direct_mean_pairwise_cosine(table[sample]), abs=1e-12)
