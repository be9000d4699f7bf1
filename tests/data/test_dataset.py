"""Tests for monta.data.dataset: prefix checks, GPTDataset splits, resumable DP iteration.

The corpus is synthetic: document ``d`` is ``[10 + d] * (len_d - 1) + [EOD]``, so every token
says which document it came from.
"""

import logging
import multiprocessing
import os
import shutil
import traceback

import numpy
import pytest
import torch

from monta.data import indexed
from monta.data.dataset import (
    PretrainingSampler,
    build_data_iterator,
    build_gpt_datasets,
    check_data_prefix,
    parse_data_path,
)
from monta.data.tokenizer import build_tokenizer

NUM_DOCS = 120
SEQ = 32
EOD = 2


def _doc(d):
    return [10 + d] * (20 + (d * 37) % 150 - 1) + [EOD]


def _write_prefix(prefix, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for doc in docs:
        builder.add_document(numpy.asarray(doc, dtype=numpy.uint16), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return _write_prefix(str(tmp_path_factory.mktemp("data") / "syn_text_document"),
                         [_doc(d) for d in range(NUM_DOCS)])


def _copy(prefix, tmp_path):
    dst = str(tmp_path / "copy")
    for ext in (".bin", ".idx"):
        shutil.copyfile(prefix + ext, dst + ext)
    return dst


def _doc_ids(tokens):
    return set((torch.as_tensor(tokens)[torch.as_tensor(tokens) != EOD] - 10).tolist())


# ---------------------------------------------------------------- check_data_prefix


def test_check_data_prefix_ok(prefix):
    s = check_data_prefix(prefix)
    assert (s.num_documents, s.num_sequences) == (NUM_DOCS, NUM_DOCS)
    assert (s.itemsize, s.dtype_code) == (2, 8)  # uint16
    assert s.num_tokens == sum(len(_doc(d)) for d in range(NUM_DOCS))


def test_index_format_constants_match_megatron():
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    assert indexed.INDEX_HEADER == _INDEX_HEADER
    assert indexed.DTYPE_ITEMSIZE == {d.value: DType.size(d.value) for d in DType}


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_check_data_prefix_missing(prefix, tmp_path, missing):
    p = _copy(prefix, tmp_path)
    os.remove(p + missing)
    with pytest.raises(FileNotFoundError, match=rf"copy\{missing}") as info:
        check_data_prefix(p)
    assert "tools/preprocess_data.py" in str(info.value)


def test_check_data_prefix_hints_text_document(prefix, tmp_path):
    p = _copy(prefix, tmp_path)
    for ext in (".bin", ".idx"):
        os.rename(p + ext, p + "_text_document" + ext)
    with pytest.raises(FileNotFoundError, match="_text_document"):
        check_data_prefix(p)
    with pytest.raises(ValueError, match="without the .bin/.idx extension"):
        check_data_prefix(p + "_text_document.bin")


def test_check_data_prefix_truncated_bin(prefix, tmp_path):
    p = _copy(prefix, tmp_path)
    with open(p + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(p + ".bin") - 2)
    with pytest.raises(ValueError, match=r"copy\.bin.*bytes but"):
        check_data_prefix(p)


@pytest.mark.parametrize("garbage", [b"", b"NOTANIDX" * 20, b"MMIDIDX\x00\x00" + b"\x01" * 30])
def test_check_data_prefix_garbage_idx(prefix, tmp_path, garbage):
    p = _copy(prefix, tmp_path)
    with open(p + ".idx", "wb") as f:
        f.write(garbage)
    with pytest.raises(ValueError, match=r"copy\.idx"):
        check_data_prefix(p)


def test_check_data_prefix_truncated_idx(prefix, tmp_path):
    p = _copy(prefix, tmp_path)
    with open(p + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(p + ".idx") - 8)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        check_data_prefix(p)


# ---------------------------------------------------------------- build_gpt_datasets


def test_parse_data_path():
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.3", "a", "7", "b"]) == (["a", "b"], [0.3, 7.0])
    for bad in ([], ["0.3", "a", "b"], ["a", "0.3"], ["-1", "a"]):
        with pytest.raises(ValueError):
            parse_data_path(bad)


def test_splits_and_samples(prefix, tokenizer):
    before = sorted(os.listdir(os.path.dirname(prefix)))
    train, valid, test = build_gpt_datasets([prefix], "8,1,1", SEQ, 1234, (500, 20, 0), tokenizer)
    assert len(train) >= 500 and len(valid) >= 20 and len(test) > 0
    assert sorted(os.listdir(os.path.dirname(prefix))) == before  # nothing cached on disk
    bounds = {"train": (0, 96), "valid": (96, 108), "test": (108, 120)}  # round(0.8 * 120) ...
    for name, ds in zip(bounds, (train, valid, test)):
        lo, hi = bounds[name]
        for i in range(0, len(ds), max(1, len(ds) // 25)):
            s = ds[i]
            assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert s["tokens"].shape == s["labels"].shape == (SEQ,)
            assert s["tokens"].dtype == s["labels"].dtype == torch.int64
            assert s["loss_mask"].dtype == torch.float32 and bool((s["loss_mask"] == 1).all())
            assert torch.equal(s["position_ids"], torch.arange(SEQ))
            assert torch.equal(s["labels"][:-1], s["tokens"][1:])  # next-token targets
            assert _doc_ids(s["tokens"]) <= set(range(lo, hi)), (name, i)


def test_build_is_deterministic(prefix, tokenizer):
    a = build_gpt_datasets([prefix], "8,1,1", SEQ, 7, (100, 0, 0), tokenizer)[0]
    b = build_gpt_datasets([prefix], "8,1,1", SEQ, 7, (100, 0, 0), tokenizer)[0]
    c = build_gpt_datasets([prefix], "8,1,1", SEQ, 8, (100, 0, 0), tokenizer)[0]
    same = [torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(20)]
    assert all(same)
    assert not all(torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(20))


def test_blend(prefix, tmp_path, tokenizer):
    other = _write_prefix(str(tmp_path / "other"), [[3000 + d] * 50 + [EOD] for d in range(40)])
    train, valid, test = build_gpt_datasets(
        ["0.25", prefix, "0.75", other], "90,10,0", SEQ, 1, (400, 40, 0), tokenizer
    )
    assert test is None and len(train) == 400 and len(valid) == 40
    from_other = sum(max(train[i]["tokens"]) >= 3000 for i in range(len(train)))
    assert 0.65 < from_other / len(train) < 0.85
    batch = next(build_data_iterator(train, 4, 0, 1, 0))
    assert sorted(batch) == ["labels", "loss_mask", "position_ids", "tokens"]  # no dataset_id


def test_empty_splits(prefix, tokenizer):
    train, valid, test = build_gpt_datasets([prefix], "100,0,0", SEQ, 1, (10, 0, 0), tokenizer)
    assert len(train) >= 10 and valid is None and test is None
    # 1e-4 of 120 documents rounds to 0: megatron-core would loop forever; we drop / refuse.
    _, _, test = build_gpt_datasets([prefix], "9999,0,1", SEQ, 1, (10, 0, 0), tokenizer)
    assert test is None
    with pytest.raises(ValueError, match="test split 0 documents"):
        build_gpt_datasets([prefix], "9999,0,1", SEQ, 1, (10, 0, 5), tokenizer)


@pytest.mark.parametrize("split", ["", "a,b", "1,2,3,4", "-1,2", "0,0,0"])
def test_bad_split(prefix, tokenizer, split):
    with pytest.raises(ValueError, match="split"):
        build_gpt_datasets([prefix], split, SEQ, 1, (10, 0, 0), tokenizer)


def test_missing_prefix_fails_before_building(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nothing.idx"):
        build_gpt_datasets([str(tmp_path / "nothing")], "1,0,0", SEQ, 1, (1, 0, 0), tokenizer)


def test_cache_dir(prefix, tmp_path, tokenizer):
    cache = tmp_path / "cache"
    a = build_gpt_datasets([prefix], "8,1,1", SEQ, 3, (50, 5, 0), tokenizer, cache_dir=str(cache))
    assert any(name.endswith("shuffle_index.npy") for name in os.listdir(cache))
    b = build_gpt_datasets([prefix], "8,1,1", SEQ, 3, (50, 5, 0), tokenizer, cache_dir=str(cache))
    assert all(torch.equal(a[0][i]["tokens"], b[0][i]["tokens"]) for i in range(50))


# ---------------------------------------------------------------- sampler / iterator


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_resume_is_exact(prefix, tokenizer):
    train = build_gpt_datasets([prefix], "8,1,1", SEQ, 5, (200, 0, 0), tokenizer)[0]
    mbs, dp, num_micro = 2, 2, 3
    gbs = mbs * dp * num_micro
    for rank in range(dp):
        full = _take(build_data_iterator(train, mbs, rank, dp, 0), 5 * num_micro)
        for k in (1, 3):
            resumed = _take(build_data_iterator(train, mbs, rank, dp, k * gbs), (5 - k) * num_micro)
            for x, y in zip(full[k * num_micro:], resumed):
                assert all(torch.equal(x[key], y[key]) for key in x)


def test_iterator_leaves_the_global_rng_alone(prefix, tokenizer):
    """Creating an iterator must not draw from torch's global RNG: a resumed run creates it
    after restoring the RNG state, so a draw would shift every later dropout mask."""
    train = build_gpt_datasets([prefix], "8,1,1", SEQ, 5, (20, 0, 0), tokenizer)[0]
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    next(build_data_iterator(train, 2, 0, 1, 0))
    assert torch.equal(torch.rand(4), expected)


def test_dp_ranks_are_disjoint_and_cover():
    total, mbs, dp = 40, 3, 2
    per_rank = []
    for rank in range(dp):
        it = iter(PretrainingSampler(total, 0, mbs, rank, dp))
        per_rank.append([i for _ in range(6) for i in next(it)])  # 6 * 3 * 2 = 36 samples
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(36))
    assert per_rank[0][:3] == [0, 1, 2] and per_rank[1][:3] == [3, 4, 5]


def test_sampler_wraps_and_warns_once(caplog):
    sampler = PretrainingSampler(10, 0, 4, 0, 1)
    with caplog.at_level(logging.WARNING, logger="monta.data.sampler"):
        it = iter(sampler)
        batches = [next(it) for _ in range(6)]
    assert batches[2] == [8, 9, 0, 1] and batches[5] == [0, 1, 2, 3]
    assert sum("wrapping around" in r.message for r in caplog.records) == 1
    resumed = iter(PretrainingSampler(10, 12, 4, 0, 1))
    assert [next(resumed) for _ in range(3)] == batches[3:]


@pytest.mark.parametrize(
    "args",
    [(0, 0, 1, 0, 1), (10, 3, 2, 0, 1), (10, -2, 2, 0, 1), (10, 0, 2, 2, 2), (10, 0, 0, 0, 1)],
)
def test_sampler_rejects_bad_args(args):
    with pytest.raises(ValueError):
        PretrainingSampler(*args)


def test_iterator_rejects_empty_dataset():
    with pytest.raises(ValueError, match="empty dataset"):
        build_data_iterator(None, 2, 0, 1, 0)


# ---------------------------------------------------------------- torch.distributed (gloo)


def _dist_worker(rank, world, init_file, prefix, cache, out):
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
        tok = build_tokenizer()
        results = {}
        blend = ["0.5", prefix, "0.5", prefix]
        for name, path, cache_dir in (
            ("memory", [prefix], None),
            ("cache", [prefix], cache),
            ("blend-memory", blend, None),
            ("blend-cache", blend, cache),
        ):
            train, _, _ = build_gpt_datasets(
                path, "8,1,1", SEQ, 11, (64, 8, 0), tok, cache_dir=cache_dir
            )
            batches = _take(build_data_iterator(train, 2, rank, world, 0), 4)
            results[name] = {
                "first": train[0]["tokens"],
                "tokens": torch.cat([b["tokens"] for b in batches]),
            }
        torch.distributed.destroy_process_group()
        torch.save(results, out)
        code = 0
    except BaseException:
        with open(out + ".err", "w") as f:
            f.write(traceback.format_exc())
        code = 1
    os._exit(code)


def test_build_under_gloo(prefix, tmp_path):
    ctx = multiprocessing.get_context("fork")  # inherits the imports: no 8 s re-import per rank
    world, outs = 2, [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    procs = [
        ctx.Process(
            target=_dist_worker,
            args=(r, world, str(tmp_path / "init"), prefix, str(tmp_path / "cache"), outs[r]),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p, out in zip(procs, outs):
        if p.is_alive():
            p.kill()
        err = open(out + ".err").read() if os.path.exists(out + ".err") else ""
        assert p.exitcode == 0, err
    results = [torch.load(out) for out in outs]
    for name in ("memory", "cache", "blend-memory", "blend-cache"):
        r0, r1 = results[0][name], results[1][name]
        assert torch.equal(r0["first"], r1["first"])  # same dataset on both ranks
        assert not torch.equal(r0["tokens"], r1["tokens"])  # different DP shards
    assert torch.equal(results[0]["memory"]["tokens"], results[0]["cache"]["tokens"])
    assert torch.equal(results[1]["blend-memory"]["tokens"], results[1]["blend-cache"]["tokens"])
