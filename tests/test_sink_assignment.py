"""Tests for nulls_megatron.sinks.assignment: pinned vectors, an independent pure-Python
reference, invariants, batching independence, statistical balance and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nulls_megatron.sinks.assignment import SinkAssignment, hash_words, mix32

PAPER = dict(n_pool=7692, sinks_per_source=100)
EDGE_IDS = [0, 1, 2, 12345, 6407813, 2**32 - 1]


# ---- pure-Python reference, written from the module docstring ----------------------
M = 0xFFFFFFFF


def ref_mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M
    x ^= x >> 15
    x = (x * 0x846CA68B) & M
    return x ^ (x >> 16)


def ref_hash(*words: int) -> int:
    h = 0x6A09E667
    for w in words:
        h = ref_mix32(h ^ ((w * 0x9E3779B9) & M))
    return h


def ref_reduce(h: int, n: int) -> int:
    return (h * n) >> 32


def ref_shard(s: int, e: int, seed: int) -> int:
    return (s % e + ref_reduce(ref_hash(seed, 0x53485244, 0, s // e, 0), e)) % e


def ref_sinks(s: int, n_pool: int, k: int, e: int, seed: int, per_layer: bool, layer: int) -> list[int]:
    p = n_pool // e
    lw = layer + 1 if per_layer else 0
    seen: set[int] = set()
    i = 0
    while len(seen) < k:  # first k distinct candidates in counter order
        seen.add(ref_reduce(ref_hash(seed, 0x53494E4B, lw, s, i), p))
        i += 1
    base = ref_shard(s, e, seed) * p
    return sorted(base + c for c in seen)


# ---- pinned vectors ----------------------------------------------------------------
def test_pinned_hash_primitives():
    assert mix32(np.array([0, 1, 0xDEADBEEF], np.uint32)).tolist() == [0, 1753845952, 3861431939]
    assert hash_words(1, 2, 3, 4, 5) == 865410697
    assert hash_words(1234, 0x53494E4B, 0, 0, 0) == 757820514


def test_pinned_vectors():
    a = SinkAssignment(7692, 100, n_shards=4, seed=1234)
    ids = torch.tensor(EDGE_IDS, dtype=torch.int64)
    assert a.shard_of(ids).tolist() == [2, 3, 0, 3, 0, 0]
    rows = a.sinks_of(ids)
    expect = [  # first 8 rows, last row, row sum
        ([3858, 3881, 3883, 3888, 3894, 3900, 3902, 3904], 5760, 479055),
        ([5797, 5799, 5803, 5822, 5835, 5844, 5874, 5877], 7640, 676294),
        ([35, 42, 46, 57, 59, 73, 106, 108], 1916, 92118),
        ([5785, 5814, 5815, 5827, 5828, 5877, 5879, 5890], 7686, 675311),
        ([22, 52, 82, 103, 118, 141, 217, 224], 1915, 100230),
        ([13, 42, 81, 87, 148, 196, 228, 261], 1922, 97263),
    ]
    for row, (head, last, total) in zip(rows.tolist(), expect):
        assert row[:8] == head and row[-1] == last and sum(row) == total
    b = SinkAssignment(7692, 100, n_shards=4, seed=1234, per_layer=True)
    got = b.sinks_of(ids[:3], layer=5)[:, :8].tolist()
    assert got == [
        [3858, 3870, 3885, 3903, 3913, 3922, 3928, 3980],
        [5791, 5836, 5842, 5859, 5870, 5889, 5897, 5903],
        [22, 55, 57, 59, 69, 143, 147, 161],
    ]


# ---- reference agreement -----------------------------------------------------------
@pytest.mark.parametrize(
    "n_pool,k,e,seed,per_layer,layer",
    [
        (7692, 100, 4, 1234, False, 0),
        (7692, 100, 1, 7, True, 0),
        (7692, 100, 2, 7, True, 5),
        (60, 20, 3, 5, False, 0),  # k == shard size: every row is its whole shard
        (2**30, 8, 1, 99, False, 0),  # large shard: 64-bit sort keys
        (1000, 999, 1, 2**32 - 1, True, 2),  # near coupon-collector: many repeats
    ],
)
def test_matches_pure_python_reference(n_pool, k, e, seed, per_layer, layer):
    rng = np.random.default_rng(seed % 1000)
    n = 300 if k <= 100 else 8
    ids = np.concatenate([EDGE_IDS, rng.integers(0, 2**32, n), rng.integers(0, 10**6, n)])
    a = SinkAssignment(n_pool, k, e, seed, per_layer)
    shards = a.shard_of_np(ids).tolist()
    rows = a.sinks_of_np(ids, layer=layer).tolist()
    for s, sh, row in zip(ids.tolist(), shards, rows):
        assert sh == ref_shard(s, e, seed)
        assert row == ref_sinks(s, n_pool, k, e, seed, per_layer, layer)


# ---- invariants --------------------------------------------------------------------
@pytest.mark.parametrize("e", [1, 4, 12])
def test_rows_are_k_distinct_ascending_inside_shard(e):
    a = SinkAssignment(**PAPER, n_shards=e, seed=3)
    ids = np.concatenate([EDGE_IDS, np.random.default_rng(0).integers(0, 2**32, 3000)])
    rows, shard = a.sinks_of_np(ids), a.shard_of_np(ids)
    p = a.shard_size
    assert rows.dtype == np.int64 and rows.shape == (len(ids), 100)
    assert (np.diff(rows, axis=1) > 0).all()  # ascending, hence distinct
    assert (rows // p == shard[:, None]).all()
    assert ((shard >= 0) & (shard < e)).all()


def test_source_zero_is_not_special():
    a = SinkAssignment(**PAPER)
    mask = a.dense_mask(torch.tensor([0, 1]))
    assert mask.sum(dim=1).tolist() == [100, 100]
    assert (mask[0] != mask[1]).any()


def test_dense_mask_matches_rows():
    a = SinkAssignment(**PAPER, n_shards=4, seed=9)
    src = torch.tensor([5, 17, 2**31])
    mask, rows = a.dense_mask(src), a.sinks_of(src)
    assert mask.dtype == torch.bool and mask.shape == (3, 7692)
    for m, r in zip(mask, rows):
        assert torch.equal(torch.nonzero(m).flatten(), r)


# ---- independence from batching ----------------------------------------------------
def test_independent_of_batch_order_composition_and_chunking():
    a = SinkAssignment(**PAPER, n_shards=4, seed=11)
    rng = np.random.default_rng(1)
    ids = np.concatenate([EDGE_IDS, rng.integers(0, 2**32, 1500), rng.integers(0, 5000, 500)])
    full = a.sinks_of_np(ids)
    perm = rng.permutation(len(ids))
    assert np.array_equal(a.sinks_of_np(ids[perm]), full[perm])
    parts = np.array_split(np.arange(len(ids)), [7, 700, 701])
    assert np.array_equal(np.concatenate([a.sinks_of_np(ids[p]) for p in parts]), full)
    dup = np.array([ids[3], ids[3], ids[10], ids[3]])
    assert np.array_equal(a.sinks_of_np(dup), full[[3, 3, 10, 3]])
    uids = ids.astype(np.uint32)
    for chunk, n_cand in [(1, None), (3, None), (10**6, None), (64, 100), (5, 2000)]:
        # n_cand=100 (= k) forces the retry path for every row with a repeat
        assert np.array_equal(a._rows(uids, 0, np.int64, chunk=chunk, n_cand=n_cand), full)
    assert np.array_equal(a.shard_of_np(ids[perm]), a.shard_of_np(ids)[perm])


def test_torch_paths_agree():
    a = SinkAssignment(**PAPER, n_shards=4, seed=2)
    ids = np.array([0, 3, 200, 255, 77])
    ref = a.sinks_of_np(ids)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        t = torch.tensor(ids.tolist(), dtype=dtype)
        out = a.sinks_of(t)
        assert out.dtype == torch.int64 and out.device == t.device
        assert np.array_equal(out.numpy(), ref)
        assert a.shard_of(t).dtype == torch.int64
    strided = torch.tensor(np.repeat(ids, 2))[::2]  # non-contiguous view
    assert np.array_equal(a.sinks_of(strided).numpy(), ref)
    assert a.sinks_of(torch.tensor([], dtype=torch.int64)).shape == (0, 100)
    if torch.cuda.is_available():
        cuda = torch.tensor(ids.tolist(), device="cuda")
        assert a.sinks_of(cuda).device == cuda.device
        assert np.array_equal(a.sinks_of(cuda).cpu().numpy(), ref)
        assert a.dense_mask(cuda).device == cuda.device


# ---- per-layer option --------------------------------------------------------------
def test_per_layer():
    ids = torch.arange(200)
    shared = SinkAssignment(**PAPER, n_shards=4, seed=5)
    assert torch.equal(shared.sinks_of(ids, layer=0), shared.sinks_of(ids, layer=7))
    per = SinkAssignment(**PAPER, n_shards=4, seed=5, per_layer=True)
    l0, l1 = per.sinks_of(ids, layer=0), per.sinks_of(ids, layer=1)
    assert (l0 != l1).any(dim=1).all()  # every source moves
    assert (l0 != shared.sinks_of(ids)).any(dim=1).all()
    assert torch.equal(per.shard_of(ids), shared.shard_of(ids))
    p = per.shard_size
    assert torch.equal(l0 // p, l1 // p)


# ---- balance -----------------------------------------------------------------------
@pytest.mark.parametrize("n", list(range(1, 40)) + [997, 10**4 + 3])
def test_shard_counts_differ_by_at_most_one(n):
    for e in (2, 3, 4, 7, 16):
        counts = np.bincount(SinkAssignment(16 * 7 * 9, 1, e, seed=n).shard_of_np(np.arange(n)), minlength=e)
        assert counts.max() - counts.min() <= 1


def test_shard_rotation_is_not_identity():
    a = SinkAssignment(**PAPER, n_shards=4)
    shard = a.shard_of_np(np.arange(40000)).reshape(-1, 4)
    rot = shard[:, 0]  # the rotation of each block
    assert (np.sort(shard, axis=1) == np.arange(4)).all()
    frac = np.bincount(rot, minlength=4) / len(rot)
    assert np.abs(frac - 0.25).max() < 0.02


@pytest.mark.parametrize("e", [1, 4])
def test_balance_paper_shape(e):
    n, k = 200_000, 100
    a = SinkAssignment(**PAPER, n_shards=e, seed=42)
    p = a.shard_size
    shard_counts, sink_counts = a.usage_counts(n)
    assert shard_counts.sum() == n and sink_counts.sum() == n * k
    assert shard_counts.max() - shard_counts.min() <= 1
    assert np.abs(shard_counts / shard_counts.mean() - 1).max() < 0.01
    # A sink of shard e is used by each of that shard's N_e sources independently with
    # probability q = k/P, so its count is Binomial(N_e, q): mean N_e q, var N_e q (1-q).
    q = k / p
    per_shard = sink_counts.reshape(e, p)
    mean = shard_counts * q
    assert np.allclose(per_shard.mean(axis=1), mean)
    ss = ((per_shard - mean[:, None]) ** 2).sum()
    expected = (p * shard_counts * q * (1 - q)).sum()
    assert 0.9 < ss / expected < 1.1
    sd = np.sqrt(shard_counts * q * (1 - q))
    assert (np.abs(per_shard - mean[:, None]) < 6 * sd[:, None]).all()
    # Two random sources of one shard share k*k/P sinks on average (hypergeometric mean).
    rng = np.random.default_rng(0)
    ids = rng.choice(n, 40_000, replace=False)
    shard = a.shard_of_np(ids)
    ids = ids[np.argsort(shard, kind="stable")]
    shard = np.sort(shard)
    same = shard[0::2][: len(ids) // 2] == shard[1::2][: len(ids) // 2]
    rows = a.sinks_of_np(ids)
    x, y = rows[0::2][same], rows[1::2][same]
    off = np.arange(len(x))[:, None] * a.n_pool  # make rows of different pairs disjoint
    both = np.sort(np.concatenate([(x + off).ravel(), (y + off).ravel()]))
    overlap = np.count_nonzero(both[1:] == both[:-1]) / len(x)  # rows hold distinct values
    assert abs(overlap / (k * k / p) - 1) < 0.05


# ---- validation --------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(n_pool=7692, sinks_per_source=100, n_shards=5), "n_shards"),
        (dict(n_pool=7692, sinks_per_source=100, n_shards=5), "n_pool"),
        (dict(n_pool=7692, sinks_per_source=0), "sinks_per_source"),
        (dict(n_pool=7692, sinks_per_source=1924, n_shards=4), "sinks_per_source"),
        (dict(n_pool=7692, sinks_per_source=100, n_shards=0), "n_shards"),
        (dict(n_pool=7692, sinks_per_source=100, seed=-1), "seed"),
        (dict(n_pool=7692, sinks_per_source=100, seed=2**32), "seed"),
        (dict(n_pool=0, sinks_per_source=1), "n_pool"),
    ],
)
def test_config_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SinkAssignment(**kwargs)


def test_source_validation():
    a = SinkAssignment(**PAPER)
    with pytest.raises(ValueError, match=r"id -5 at position 3"):
        a.sinks_of(torch.tensor([0, 1, 2, -5, -6]))
    with pytest.raises(ValueError, match=r"id 4294967296 at position 1"):
        a.shard_of(torch.tensor([2**32 - 1, 2**32]))
    with pytest.raises(ValueError, match=r"id -1 at position 0"):
        a.sinks_of_np(np.array([-1, 2**40]))
    with pytest.raises(ValueError, match="dtype"):
        a.sinks_of(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="dtype"):
        a.shard_of(torch.tensor([True]))
    with pytest.raises(ValueError, match="dtype"):
        a.sinks_of_np(np.array([1.0]))
    with pytest.raises(ValueError, match="1-D"):
        a.sinks_of(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="layer"):
        a.sinks_of(torch.tensor([1]), layer=-1)
