"""Partitioners: every training sample lands in exactly one partition, deterministically by seed."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfree_core.data.partition import partition_indices
from bpfree_core.errors import ConfigError


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(20, 400),
    k=st.integers(1, 8),
    kind=st.sampled_from(["iid", "dirichlet:0.1", "dirichlet:1.0", "dirichlet:100", "shards:2"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_sample_lands_in_exactly_one_partition(n, k, kind, seed):
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))
    parts = partition_indices(labels, k, kind, seed)
    assert len(parts) == k
    joined = torch.cat(parts).sort().values
    assert torch.equal(joined, torch.arange(n))          # covering and disjoint


def test_partitions_are_deterministic_and_seed_dependent():
    labels = torch.arange(1000) % 10
    a = partition_indices(labels, 4, "dirichlet:0.5", seed=1)
    b = partition_indices(labels, 4, "dirichlet:0.5", seed=1)
    c = partition_indices(labels, 4, "dirichlet:0.5", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_non_iid_partitions_skew_labels():
    labels = torch.arange(6000) % 10
    iid = partition_indices(labels, 5, "iid", seed=0)
    shards = partition_indices(labels, 5, "shards:2", seed=0)
    dirich = partition_indices(labels, 5, "dirichlet:0.05", seed=0)
    classes = [labels[p].unique().numel() for p in shards]
    assert all(labels[p].unique().numel() == 10 for p in iid)
    assert max(classes) <= 4                              # 2 label-sorted shards per client
    assert min(labels[p].unique().numel() for p in dirich if p.numel()) < 10


def test_bad_partition_specs_are_clear():
    with pytest.raises(ConfigError, match="dirichlet:ALPHA"):
        partition_indices(torch.arange(10), 2, "dirichlet:abc", 0)
    with pytest.raises(ConfigError, match="needs 40 shards"):
        partition_indices(torch.arange(30), 20, "shards:2", 0)


def test_min_partition_size_redraws_a_skewed_dirichlet_split_and_keeps_the_first_otherwise():
    labels = torch.randint(0, 10, (3000,), generator=torch.Generator().manual_seed(0))
    first = partition_indices(labels, 100, "dirichlet:0.1", seed=3)
    assert min(p.numel() for p in first) < 5
    assert all(torch.equal(a, b) for a, b in zip(first, partition_indices(labels, 100, "dirichlet:0.1",
                                                                        seed=3, min_size=0), strict=True))
    redrawn = partition_indices(labels, 20, "dirichlet:0.5", seed=3, min_size=40)
    assert min(p.numel() for p in redrawn) >= 40
    assert sorted(torch.cat(redrawn).tolist()) == list(range(3000))


def test_an_impossible_min_partition_size_is_one_sentence():
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"gives a client only 100 of 1000 samples, under "
                                          r"federation.min_partition_size = 101"):
        partition_indices(labels, 10, "iid", seed=0, min_size=101)
    with pytest.raises(ConfigError, match=r"dirichlet:0.05 over 200 clients .* in 20 draws"):
        partition_indices(labels, 200, "dirichlet:0.05", seed=0, min_size=5)


def test_natural_ids_give_client_k_every_sample_of_id_k() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    groups = torch.tensor([1, 0, 1, 2, 0, 1, 2])
    parts = partition_indices(labels, 3, "natural", seed=0, groups=groups)
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 5], [3, 6]]
    by_label = partition_indices(labels, 3, "natural:label", seed=5)
    assert [p.tolist() for p in by_label] == [[0, 3], [1, 4], [2, 5, 6]]
    with pytest.raises(ConfigError, match="the data has 3 group ids but federation.clients = 2; "
                                          "set federation.clients = 3"):
        partition_indices(labels, 2, "natural", seed=0, groups=groups)
    with pytest.raises(ConfigError, match="this dataset has none: give npz arrays group_train"):
        partition_indices(labels, 3, "natural", seed=0)
    with pytest.raises(ConfigError, match="natural:label"):
        partition_indices(labels, 3, "natural:site", seed=0)
