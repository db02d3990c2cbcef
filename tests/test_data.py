"""Tests for asyncfl.data: articles, packing, partitions, offline split fallback, caches."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from asyncfl import data as D


def flat_rows(blocks: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(row) for row in blocks.tolist()}


def test_split_articles_on_top_level_headings_only():
    lines = ["", " = Alpha = \n", "", " text a \n", " = = Sub = = \n", " more a \n", " = Beta = \n", " b \n"]
    assert D.split_articles(lines) == [
        " = Alpha = \n text a \n = = Sub = = \n more a \n",
        " = Beta = \n b \n",
    ]


def test_local_file_reads_like_hub_rows(make_cfg):
    # CRLF and " " blank lines become Hub-style rows: "" or text ending in "\n"
    lines = D.read_lines(make_cfg(), "validation")
    assert len(lines) == 3760
    assert lines[0] == "" and lines[1] == " = Homarus gammarus = \n"
    assert not any("\r" in line for line in lines)


def test_tokenized_split_has_one_eos_per_article(make_cfg):
    cfg = make_cfg()
    tokens = D.tokenized_split(cfg, "validation")
    tok = D._tokenizer(cfg)
    assert tokens.num_articles == 60
    assert int((tokens.ids == tok.eos_token_id).sum()) == 60
    first = tokens.ids[tokens.starts[0]:tokens.starts[1]]
    text = tok.decode(first[:-1].tolist())
    assert text.startswith(" = Homarus gammarus = \n") and first[-1] == tok.eos_token_id


def test_pack_blocks_are_contiguous_slices():
    ids = np.arange(103)
    blocks = D.pack_blocks(ids, 10)
    assert blocks.shape == (10, 10) and blocks.dtype == torch.int64
    assert torch.equal(blocks.flatten(), torch.arange(100))
    assert torch.equal(blocks[3], torch.arange(30, 40))


def test_iid_partitions_are_disjoint_and_cover_all_blocks(make_cfg):
    cfg = make_cfg(partitioner="iid", max_train_blocks=0)
    n = 3
    parts = [D.load_partition(cfg, k, n) for k in range(n)]
    everything = D.pack_blocks(D.tokenized_split(cfg, "validation").ids, cfg.block_size)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(everything) and max(sizes) - min(sizes) <= 1
    assert all(p.shape[1] == 32 for p in parts)
    rows = [flat_rows(p) for p in parts]
    assert set().union(*rows) == flat_rows(everything)
    assert sum(len(r) for r in rows) == len(flat_rows(everything))  # no block in two clients


def test_size_skew_is_imbalanced_yet_covers_all(make_cfg):
    cfg = make_cfg(partitioner="size-skew", partition_alpha=0.3, max_train_blocks=0)
    n = 5
    sizes = [len(D.load_partition(cfg, k, n)) for k in range(n)]
    total = len(D.pack_blocks(D.tokenized_split(cfg, "validation").ids, cfg.block_size))
    assert sum(sizes) == total and min(sizes) >= 1
    assert max(sizes) >= 2 * min(sizes)
    rows = [flat_rows(D.load_partition(cfg, k, n)) for k in range(n)]
    assert sum(len(r) for r in rows) == len(set().union(*rows))


def test_dirichlet_sizes_every_partition_gets_one():
    sizes = D.split_sizes_dirichlet(10, 8, alpha=0.01, seed=3)
    assert sizes.sum() == 10 and sizes.min() >= 1


def test_articles_partitioner_keeps_articles_whole(make_cfg):
    # Prepare
    cfg = make_cfg(partitioner="articles", max_train_blocks=0)
    n = 4
    tok = D._tokenizer(cfg)
    articles = D.split_articles(D.read_lines(cfg, "validation"))
    # Execute
    texts = [tok.decode(D.load_partition(cfg, k, n).flatten().tolist()) for k in range(n)]
    # Assert: a client's text is whole articles separated by eos, then at most one cut tail
    # (the part shorter than a block is dropped); no article shows up in two clients
    known = set(articles)
    seen: list[str] = []
    for text in texts:
        *complete, tail = text.split("<|endoftext|>")
        assert complete, "every client holds at least one whole article"
        assert all(piece in known for piece in complete)
        assert tail == "" or any(a.startswith(tail) for a in articles)
        seen += complete + ([tail.splitlines()[0]] if tail.strip() else [])
    titles = [piece.splitlines()[0] for piece in seen]
    assert len(titles) == len(set(titles))
    assert len(seen) >= len(articles) - n


def test_assign_articles_gives_each_to_the_least_loaded_partition():
    lengths = np.array([100, 5, 7, 60, 30, 30, 8, 9, 50])
    # by hand, the loads after each article: [100,0,0] [100,5,0] [100,5,7] [100,65,7]
    # [100,65,37] [100,65,67] [100,73,67] [100,73,76] [100,123,76]
    assert D.assign_articles(lengths, 3).tolist() == [0, 1, 2, 1, 2, 2, 1, 2, 1]


def test_partitions_are_deterministic_and_seeded(make_cfg):
    cfg = make_cfg(partitioner="iid")
    first = D.load_partition(cfg, 1, 4).clone()
    D.clear_cache()
    assert torch.equal(D.load_partition(cfg, 1, 4), first)
    assert not torch.equal(D.load_partition(make_cfg(partitioner="iid", seed=1), 1, 4), first)


def test_max_train_blocks_caps_each_client(make_cfg):
    assert [len(D.load_partition(make_cfg(max_train_blocks=5), k, 3)) for k in range(3)] == [5, 5, 5]


def test_partition_id_is_validated(make_cfg):
    with pytest.raises(ValueError, match=r"partition_id 4 is out of range \[0, 4\)"):
        D.load_partition(make_cfg(), 4, 4)
    with pytest.raises(ValueError, match="num_partitions"):
        D.load_partition(make_cfg(), 0, 0)


def test_offline_train_split_falls_back_to_validation(make_cfg, caplog):
    D.clear_cache()
    with caplog.at_level(logging.WARNING, logger="asyncfl.data"):
        split = D.resolve_train_split(make_cfg(train_split="train"))
    assert split == "validation"
    assert "TRAIN ON \"validation\"" in caplog.text and "eval-split` = \"test\"" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asyncfl.data"):
        assert D.resolve_train_split(make_cfg(train_split="test")) == "test"
    assert "same split" in caplog.text


def test_eval_blocks_are_the_first_blocks_of_the_eval_split(make_cfg):
    cfg = make_cfg(eval_max_blocks=6)
    blocks = D.load_eval_blocks(cfg)
    stream = D.tokenized_split(cfg, "test").ids
    assert torch.equal(blocks, torch.as_tensor(stream[: 6 * 32]).reshape(6, 32))
    assert len(D.load_eval_blocks(make_cfg(eval_max_blocks=0))) == len(stream) // 32


def test_token_cache_on_disk_is_reused(make_cfg):
    cfg = make_cfg()
    D.clear_cache()
    before = D.tokenized_split(cfg, "test")
    files = list(D.DISK_CACHE_DIR.glob("tokens-*.npz"))
    assert files
    D.clear_cache()
    after = D.tokenized_split(cfg, "test")
    assert np.array_equal(before.ids, after.ids) and np.array_equal(before.starts, after.starts)
    assert list(D.DISK_CACHE_DIR.glob("tokens-*.npz")) == files


def test_missing_split_file_is_named(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="wiki.test.raw"):
        D.load_eval_blocks(make_cfg(data_dir=str(tmp_path)))


def test_hub_dataset_unreachable_fails_fast(make_cfg, monkeypatch):
    from asyncfl.model import HubUnavailableError, hub_reachable

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    if hub_reachable(timeout=2.0):
        pytest.skip("the Hugging Face Hub is reachable from here")
    with pytest.raises(HubUnavailableError, match="data-dir"):
        D.load_eval_blocks(make_cfg(data_dir=""))
