"""Bucket policies, the token-count table and chunking: CPU only."""

from __future__ import annotations

import pytest

from graphs.buckets import BucketTable, bucket_list


def test_fastdeploy_policy():
    buckets = bucket_list("fastdeploy")
    assert buckets[:4] == (1, 2, 4, 8) and buckets[-1] == 512
    assert 128 in buckets and 136 not in buckets and 144 in buckets and 256 in buckets and 272 not in buckets
    assert 288 in buckets and 320 in buckets
    assert bucket_list("fastdeploy", 1024)[-1] == 1024


def test_vllm_and_sglang_policies():
    vllm = bucket_list("vllm")
    assert vllm[:4] == (1, 2, 4, 8) and 248 in vllm and 256 in vllm and 264 not in vllm and vllm[-1] == 512
    sglang = bucket_list("sglang")
    assert sglang[:6] == (1, 2, 4, 8, 12, 16) and 496 in sglang and 480 in sglang and sglang[-1] == 512
    assert bucket_list("sglang", 1024)[-1] == 1024 and 544 in bucket_list("sglang", 1024)


def test_pow2_policy_defaults_to_65536():
    buckets = bucket_list("pow2")
    assert buckets[0] == 1 and buckets[-1] == 65536 and len(buckets) == 17


@pytest.mark.parametrize(
    "policy,needle",
    [
        ([4, 2], "sorted"),
        ([1, 1], "sorted"),
        ([0, 2], "positive"),
        ([], "empty"),
        ("nope", "unknown"),
        ([1.5], "positive"),
    ],
)
def test_invalid_buckets_are_rejected(policy, needle):
    with pytest.raises(ValueError, match=needle):
        bucket_list(policy)


def test_explicit_list_rejects_max_size():
    with pytest.raises(ValueError, match="max_size"):
        bucket_list([1, 2], 4)


def test_table_picks_the_smallest_bucket_not_below_t():
    table = BucketTable([1, 2, 4, 8, 24, 64])
    expected = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 24, 24: 24, 25: 64, 64: 64}
    assert {t: table.bucket_for(t) for t in expected} == expected
    for t in range(1, 65):
        bucket = table.bucket_for(t)
        assert bucket >= t and all(b < t for b in table.buckets if b < bucket)
    with pytest.raises(ValueError, match="num_tokens=65"):
        table.bucket_for(65)
    with pytest.raises(ValueError, match="num_tokens=0"):
        table.bucket_for(0)


@pytest.mark.parametrize("num_tokens", [0, 1, 63, 64, 65, 128, 200, 1000])
def test_chunks_cover_every_token_once(num_tokens):
    table = BucketTable([1, 2, 4, 8, 16, 32, 64])
    chunks = table.chunks(num_tokens)
    assert sum(c.size for c in chunks) == num_tokens
    assert [c.start for c in chunks] == [sum(c.size for c in chunks[:i]) for i in range(len(chunks))]
    assert all(c.size <= c.bucket <= 64 and c.bucket == table.bucket_for(c.size) for c in chunks)
    assert all(c.size == 64 for c in chunks[:-1])
