"""Tests for asyncfl.data: articles, packing, partitions, offline split fallback, caches."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncfl import data as D
from tests.conftest import TOKENIZER_DIR, WIKITEXT_DIR

PARTITIONERS = ("iid", "size-skew", "articles")


@pytest.fixture(scope="module")
def reference_articles(shared_dir) -> list[np.ndarray]:
    """The validation split's articles as token arrays, each followed by eos, recomputed here
    from the raw file and the tokenizer (none of asyncfl.data's reading, caching or packing)."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(TOKENIZER_DIR))
    text = (WIKITEXT_DIR / "wiki.valid.raw").read_bytes().decode("utf-8").replace("\r\n", "\n")
    rows = ["" if not line.strip() else line + "\n" for line in text.split("\n")[:-1]]
    articles: list[str] = []
    for row in rows:
        if re.fullmatch(r" = [^=].* = \n", row) or not articles:
            articles.append("")
        articles[-1] += row
    return [
        np.asarray(tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for a in articles if a.strip()
    ]


def reference_blocks(articles: list[np.ndarray], block_size: int) -> Counter:
    """Every block of the split's token stream, as a multiset of token tuples."""
    stream = np.concatenate(articles)
    n = len(stream) // block_size
    return Counter(map(tuple, stream[: n * block_size].reshape(n, block_size).tolist()))


def all_partitions(cfg, n: int) -> list[torch.Tensor]:
    return [D.load_partition(cfg, k, n) for k in range(n)]


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
    first = tokens.ids[tokens.starts[0] : tokens.starts[1]]
    text = tok.decode(first[:-1].tolist())
    assert text.startswith(" = Homarus gammarus = \n") and first[-1] == tok.eos_token_id


def test_pack_blocks_are_contiguous_slices():
    ids = np.arange(103)
    blocks = D.pack_blocks(ids, 10)
    assert blocks.shape == (10, 10) and blocks.dtype == torch.int64
    assert torch.equal(blocks.flatten(), torch.arange(100))
    assert torch.equal(blocks[3], torch.arange(30, 40))


def test_dirichlet_sizes_every_partition_gets_one():
    sizes = D.split_sizes_dirichlet(10, 8, alpha=0.01, seed=3)
    assert sizes.sum() == 10 and sizes.min() >= 1


def test_partitioners_are_flwr_datasets_and_give_the_clients_data(make_cfg):
    from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner, SizePartitioner

    n = 4
    for name, cls in (("iid", IidPartitioner), ("size-skew", SizePartitioner), ("articles", NaturalIdPartitioner)):
        cfg = make_cfg(partitioner=name, max_train_blocks=0)
        tokens = D.tokenized_split(cfg, "validation")
        partitioner = D.make_partitioner(cfg, tokens, n)
        assert type(partitioner) is cls and partitioner.num_partitions == n
        blocks = D.pack_blocks(tokens.ids, cfg.data.block_size)
        for k in range(n):
            rows = partitioner.load_partition(k).to_dict()
            if name == "articles":
                text = np.concatenate([tokens.ids[tokens.starts[a] : tokens.starts[a + 1]] for a in rows["article"]])
                expected = D.pack_blocks(text, cfg.data.block_size)
            else:
                expected = blocks[rows["block"]]
            assert torch.equal(D.load_partition(cfg, k, n), expected), (name, k)


@pytest.mark.parametrize("name", ["iid", "size-skew"])
def test_block_partitions_hold_every_block_exactly_once(make_cfg, reference_articles, name):
    cfg = make_cfg(partitioner=name, partition_alpha=0.5, max_train_blocks=0)
    parts = all_partitions(cfg, 5)
    assert all(len(p) >= 1 and p.shape[1] == 32 for p in parts)
    held = Counter(row for p in parts for row in map(tuple, p.tolist()))
    assert held == reference_blocks(reference_articles, 32)  # none missing, none twice


def test_iid_sizes_are_within_one_block(make_cfg, reference_articles):
    for n in (3, 7):
        sizes = [len(p) for p in all_partitions(make_cfg(partitioner="iid", max_train_blocks=0), n)]
        assert sum(sizes) == len(np.concatenate(reference_articles)) // 32
        assert max(sizes) - min(sizes) <= 1, sizes


def test_size_skew_spread_follows_alpha(make_cfg):
    # Dirichlet(alpha) shares over n partitions have a squared coefficient of variation of
    # expectation (n - 1) / (n * alpha + 1): the smaller alpha, the more imbalanced
    n = 5
    tokens = D.tokenized_split(make_cfg(), "validation")
    spread = {}
    for alpha in (0.1, 1.0, 10.0):
        cv2 = []
        for seed in range(20):
            cfg = make_cfg(partitioner="size-skew", partition_alpha=alpha, seed=seed)
            partitioner = D.make_partitioner(cfg, tokens, n)
            sizes = np.array([len(partitioner.load_partition(k)) for k in range(n)])
            assert sizes.min() >= 1
            cv2.append(sizes.var() / sizes.mean() ** 2)
        spread[alpha] = float(np.mean(cv2))
        theory = (n - 1) / (n * alpha + 1)
        assert 0.6 * theory < spread[alpha] < 1.4 * theory, (alpha, spread[alpha], theory)
    assert spread[0.1] > spread[1.0] > spread[10.0]


def test_articles_partitions_hold_whole_articles_once_each_balanced_by_tokens(make_cfg, reference_articles):
    cfg = make_cfg(partitioner="articles", max_train_blocks=0)
    n = 4
    eos = int(reference_articles[0][-1])
    index = {tuple(a.tolist()): i for i, a in enumerate(reference_articles)}
    assert len(index) == len(reference_articles) == 60
    owned: list[list[int]] = []
    for part in all_partitions(cfg, n):
        flat = part.flatten().numpy()
        *whole, tail = np.split(flat, np.flatnonzero(flat == eos) + 1)
        assert whole, "every client holds at least one whole article"
        owned.append([index[tuple(piece.tolist())] for piece in whole])  # KeyError: not a whole article
        if len(tail):  # the start of the client's last article, cut where its last block ends
            starts = [
                i
                for i, a in enumerate(reference_articles)
                if len(a) > len(tail) and np.array_equal(a[: len(tail)], tail)
            ]
            assert len(starts) == 1
            owned[-1] += starts
    # every article has >= 893 tokens, more than the tail packing drops: each one is seen
    assert sorted(a for o in owned for a in o) == list(range(60))
    loads = [sum(len(reference_articles[a]) for a in o) for o in owned]
    assert max(loads) - min(loads) <= max(len(a) for a in reference_articles)


def test_assign_articles_gives_each_to_the_least_loaded_partition():
    lengths = np.array([100, 5, 7, 60, 30, 30, 8, 9, 50])
    # by hand, the loads after each article: [100,0,0] [100,5,0] [100,5,7] [100,65,7]
    # [100,65,37] [100,65,67] [100,73,67] [100,73,76] [100,123,76]
    assert D.assign_articles(lengths, 3).tolist() == [0, 1, 2, 1, 2, 2, 1, 2, 1]


@pytest.mark.parametrize("name", PARTITIONERS)
def test_partitions_are_deterministic_per_seed(make_cfg, name):
    cfg = make_cfg(partitioner=name, max_train_blocks=0)
    first = [p.clone() for p in all_partitions(cfg, 4)]
    D.clear_cache()
    assert all(torch.equal(a, b) for a, b in zip(first, all_partitions(cfg, 4)))
    other = all_partitions(make_cfg(partitioner=name, seed=7, max_train_blocks=0), 4)
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


_DIGESTS = """
import hashlib
from tests.conftest import tiny_config
from asyncfl import data as D
for name in ("iid", "size-skew", "articles"):
    cfg = tiny_config(partitioner=name, max_train_blocks=0)
    print(name, [hashlib.sha256(D.load_partition(cfg, k, 5).numpy().tobytes()).hexdigest() for k in range(5)])
"""


@pytest.mark.slow
def test_every_process_computes_the_same_partitions(make_cfg, tmp_path):
    # a fresh interpreter (another hash seed, a cold token cache) is what each node runs
    here = "\n".join(
        f"{name} {[hashlib.sha256(p.numpy().tobytes()).hexdigest() for p in all_partitions(cfg, 5)]}"
        for name, cfg in ((name, make_cfg(partitioner=name, max_train_blocks=0)) for name in PARTITIONERS)
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", XDG_CACHE_HOME=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", _DIGESTS],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


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
    assert 'TRAIN ON "validation"' in caplog.text and 'eval-split` = "test"' in caplog.text
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
