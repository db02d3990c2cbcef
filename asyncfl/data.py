"""WikiText for asyncfl: load a split, cut it into articles, tokenize, pack blocks, partition.

Notes
-----
- Lines follow the Hugging Face `wikitext` rows: a blank line is "", other lines keep their
  "\\n". Local files (CRLF, blank lines holding one space) are read in text mode and mapped to
  the same rows, so the Hub and a `data-dir` give the same articles and tokens.
- An article starts at a top-level heading line ` = Title = ` and is tokenized whole, followed
  by one eos token. Blocks are consecutive `block-size` slices of that token stream (the tail
  shorter than a block is dropped); labels are the inputs (the model shifts them).
- WikiText-2's train split is not available offline: with a `data-dir` lacking
  `wiki.train.raw`, `train-split` "train" falls back to "validation" (logged);
  `resolve_train_split` says which split was used.
- Token ids are cached in memory per (tokenizer, split, source), so a long-lived process (a Ray
  actor) tokenizes once, and on disk under `DISK_CACHE_DIR` keyed by a hash of the text and the
  tokenizer, for deployment where every message starts a fresh process. `datasets`' own cache
  is not used for this: it would mean `load_dataset` (Arrow files per source under the HF
  cache) and `map` fingerprints that hash the tokenizer object; the token stream is one array
  per split, and a content hash is the simpler, exact key, the same for the Hub and a
  `data-dir`.

Partitions
----------
flwr-datasets partitioners (`make_partitioner`) split a `datasets.Dataset` with one row per
unit, shuffled by `Dataset.shuffle(seed=seed)` as `FederatedDataset` does (which itself is not
used: it loads a dataset by name and partitions its rows, while our units exist only after
tokenizing and packing):
- "iid": `IidPartitioner` over the token blocks.
- "size-skew": `SizePartitioner` over the token blocks; the sizes are ours
  (`split_sizes_dirichlet`: proportional to a Dirichlet(`partition-alpha`) draw, every
  partition >= 1 block, for any alpha > 0). `DirichletPartitioner` does not fit: it splits each
  label's rows by its own Dirichlet draw (a label-skew partitioner; with one constant label it
  would give these sizes) and redraws until every partition reaches `min_partition_size`,
  raising after 10 redraws: with 1,900 blocks and 8 partitions it fails for 12 of 20 seeds at
  alpha 0.1, an accepted `partition-alpha`.
- "articles": `NaturalIdPartitioner` over the articles, by a "client" column that we compute
  (`assign_articles`: balanced by tokens). flwr-datasets has no partitioner that balances by a
  weight: `NaturalIdPartitioner` makes one partition per distinct id (by article it would need
  exactly one client per article), and `GroupedNaturalIdPartitioner` groups ids by count, which
  neither fixes the number of partitions nor balances tokens (WikiText-2 validation articles
  hold 893 to 21,280 GPT-2 tokens).
Partitions are disjoint, cover every block (every article, before packing drops each client's
tail), and depend only on the tokens, `partitioner`, `partition-alpha`, `seed`, `block-size`
and the number of partitions: every process of a run computes the same ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from asyncfl.model import build_tokenizer, hub_unavailable, require_hub

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

    from asyncfl.config import AppConfig

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
HEADING = re.compile(r"^ = [^=].* = $")  # top-level heading; sub-headings are " = = X = = "
DISK_CACHE_DIR: Path | None = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "asyncfl"

_TOKENIZERS: dict[str, Any] = {}
_SPLITS: dict[tuple[str, ...], TokenizedSplit] = {}
_BLOCKS: dict[tuple, list[torch.Tensor]] = {}
_WARNED: set[str] = set()


@dataclass(frozen=True)
class TokenizedSplit:
    """One split as a token stream: `ids` (n_tokens,) int64 with an eos after every article;
    article i is `ids[starts[i]:starts[i + 1]]` (eos included)."""

    ids: np.ndarray
    starts: np.ndarray  # (n_articles + 1,) offsets, starts[-1] == len(ids)

    @property
    def num_articles(self) -> int:
        return len(self.starts) - 1


def clear_cache() -> None:
    """Forget the in-memory tokenizers, token streams and partitions."""
    for cache in (_TOKENIZERS, _SPLITS, _BLOCKS, _WARNED):
        cache.clear()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


# --------------------------------------------------------------------------------------------
# Raw text
# --------------------------------------------------------------------------------------------
def resolve_train_split(cfg: AppConfig) -> str:
    """The split the clients actually train on (record it in the results).

    `train-split` "train" with a `data-dir` that has no `wiki.train.raw` falls back to
    "validation" with a warning. Training and evaluating on one split is warned about loudly.
    """
    split = cfg.data.train_split
    if cfg.data.data_dir and split == "train" and not (Path(cfg.data.data_dir) / SPLIT_FILES["train"]).exists():
        _warn_once(
            f'`data-dir` = "{cfg.data.data_dir}" has no {SPLIT_FILES["train"]}: offline runs TRAIN ON '
            f'"validation" and evaluate on `eval-split` = "{cfg.data.eval_split}"'
        )
        split = "validation"
    if split == cfg.data.eval_split:
        _warn_once(
            f'!!! clients train on the same split they are evaluated on ("{split}"): perplexity '
            "measures memorisation, not generalisation; set `train-split`/`eval-split` apart !!!"
        )
    return split


def _source(cfg: AppConfig) -> str:
    if cfg.data.data_dir:
        return str(Path(cfg.data.data_dir).expanduser().resolve())
    return f"hub:{cfg.data.dataset}/{cfg.data.dataset_config}"


def read_lines(cfg: AppConfig, split: str) -> list[str]:
    """The rows of `split` ("train", "validation", "test") as Hugging Face `wikitext` gives them.

    Raises
    ------
    FileNotFoundError
        `data-dir` lacks the split's file.
    HubUnavailableError
        `data-dir` is "" and the Hub cannot be reached.
    """
    if cfg.data.data_dir:
        path = Path(cfg.data.data_dir).expanduser() / SPLIT_FILES[split]
        if not path.is_file():
            have = sorted(p.name for p in path.parent.glob("*")) if path.parent.is_dir() else "no such folder"
            raise FileNotFoundError(
                f'`data-dir` = "{cfg.data.data_dir}": no {path.name} for split "{split}" (found: {have})'
            )
        with open(path, encoding="utf-8") as f:  # text mode: CRLF -> "\n"
            return ["" if not line.strip() else line for line in f]
    import datasets

    require_hub("dataset", cfg.data.dataset)
    try:
        rows = datasets.load_dataset(cfg.data.dataset, cfg.data.dataset_config, split=split)["text"]
    except (OSError, ConnectionError) as exc:
        raise hub_unavailable("dataset", cfg.data.dataset, exc) from exc
    return ["" if not row.strip() else row for row in rows]


def split_articles(lines: list[str]) -> list[str]:
    """Join rows into whole articles, each starting at a top-level heading row.

    Rows before the first heading belong to the first article; empty articles are dropped.
    """
    articles: list[list[str]] = [[]]
    for line in lines:
        if HEADING.match(line.rstrip("\n")) and articles[-1]:
            articles.append([])
        articles[-1].append(line)
    return [text for text in ("".join(a) for a in articles) if text.strip()]


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------
def _tokenizer(cfg: AppConfig) -> Any:
    spec = cfg.model.tokenizer or cfg.model.model
    if spec not in _TOKENIZERS:
        _TOKENIZERS[spec] = build_tokenizer(cfg)
    return _TOKENIZERS[spec]


def _fingerprint(tokenizer: Any, articles: list[str]) -> str:
    """Hash of the text and of the tokenizer's vocabulary and behaviour (disk-cache key)."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer("Hello world, café 1 @,@ 000 東京", verbose=False)["input_ids"]).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    for text in articles:
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _tokenize(tokenizer: Any, articles: list[str]) -> TokenizedSplit:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token to separate articles")
    encoded = tokenizer(articles, add_special_tokens=False, verbose=False)["input_ids"]
    pieces = [np.asarray(ids + [eos], dtype=np.int64) for ids in encoded]
    starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    return TokenizedSplit(np.concatenate(pieces), starts)


def _load_or_tokenize(tokenizer: Any, articles: list[str]) -> TokenizedSplit:
    """Tokenize, going through the on-disk cache when `DISK_CACHE_DIR` is set."""
    if DISK_CACHE_DIR is None:
        return _tokenize(tokenizer, articles)
    path = Path(DISK_CACHE_DIR) / f"tokens-{_fingerprint(tokenizer, articles)}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return TokenizedSplit(z["ids"], z["starts"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable token cache %s: %s", path, exc)
    split = _tokenize(tokenizer, articles)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, ids=split.ids, starts=split.starts)
        os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file
    except OSError as exc:
        log.warning("cannot write token cache %s: %s", path, exc)
    return split


def tokenized_split(cfg: AppConfig, split: str) -> TokenizedSplit:
    """The token stream of `split`, cached per (tokenizer, split, source)."""
    key = (cfg.model.tokenizer or cfg.model.model, split, _source(cfg))
    if key not in _SPLITS:
        articles = split_articles(read_lines(cfg, split))
        _SPLITS[key] = _load_or_tokenize(_tokenizer(cfg), articles)
    return _SPLITS[key]


def pack_blocks(ids: np.ndarray | torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut a 1-D token stream into consecutive blocks: int64 tensor (N, block_size).

    Block i is `ids[i * block_size:(i + 1) * block_size]`; the tail shorter than a block is dropped.
    """
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
    n = ids.numel() // block_size
    return ids[: n * block_size].reshape(n, block_size).clone()


# --------------------------------------------------------------------------------------------
# Partitions (flwr-datasets partitioners over the units we partition)
# --------------------------------------------------------------------------------------------
def split_sizes_dirichlet(total: int, num_partitions: int, alpha: float, seed: int) -> np.ndarray:
    """Partition sizes summing to `total`, each >= 1, proportional to Dirichlet(alpha) draws."""
    p = np.random.default_rng(seed).dirichlet(np.full(num_partitions, alpha))
    if not np.all(np.isfinite(p)):
        raise ValueError(f"`partition-alpha` = {alpha} gives non-finite Dirichlet proportions")
    share = p * (total - num_partitions)
    sizes = 1 + np.floor(share).astype(np.int64)
    remainder = total - int(sizes.sum())  # largest fractional parts get the leftover blocks
    sizes[np.argsort(-(share - np.floor(share)), kind="stable")[:remainder]] += 1
    return sizes


def assign_articles(lengths: np.ndarray, num_partitions: int) -> np.ndarray:
    """The partition of each article, balanced by tokens: in the given order, each article goes
    to the partition holding the fewest tokens so far (ties: lowest id). With at least
    `num_partitions` articles every partition gets >= 1."""
    load = np.zeros(num_partitions, dtype=np.int64)
    owner = np.empty(len(lengths), dtype=np.int64)
    for a, n_tokens in enumerate(lengths):
        owner[a] = k = int(np.argmin(load))
        load[k] += n_tokens
    return owner


def make_partitioner(cfg: AppConfig, tokens: TokenizedSplit, num_partitions: int) -> Partitioner:
    """The flwr-datasets partitioner of `cfg.data.partitioner`, its dataset already assigned.

    Its dataset has one row per unit we partition, in the random order of
    `Dataset.shuffle(seed=cfg.train.seed)` (as flwr-datasets' `FederatedDataset` shuffles before
    partitioning):
    - "iid": `IidPartitioner` (contiguous shards, sizes within one of each other); a row is a
      block, column "block": its index in `pack_blocks(tokens.ids, cfg.data.block_size)`.
    - "size-skew": `SizePartitioner` over the same block rows, the sizes drawn by
      `split_sizes_dirichlet(n_blocks, num_partitions, cfg.data.partition_alpha, cfg.train.seed + 1)`.
    - "articles": `NaturalIdPartitioner` by column "client"; a row is an article (columns
      "article": its index in `tokens`, "tokens": its length, "client": `assign_articles`
      over the rows in their shuffled order).
    Partition ids are 0 .. num_partitions - 1 in every case, given at least `num_partitions` units
    (`_partition` checks).
    """
    import datasets
    from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner, SizePartitioner

    partitioner: Partitioner
    if cfg.data.partitioner == "articles":
        lengths = np.diff(tokens.starts)
        shuffled = datasets.Dataset.from_dict({"article": np.arange(len(lengths))}).shuffle(seed=cfg.train.seed)
        order = _column(shuffled, "article")
        rows = datasets.Dataset.from_dict(
            {"article": order, "tokens": lengths[order], "client": assign_articles(lengths[order], num_partitions)}
        )
        partitioner = NaturalIdPartitioner(partition_by="client")
    else:
        num_blocks = len(tokens.ids) // cfg.data.block_size
        rows = datasets.Dataset.from_dict({"block": np.arange(num_blocks)}).shuffle(seed=cfg.train.seed)
        if cfg.data.partitioner == "iid":
            partitioner = IidPartitioner(num_partitions)
        else:  # "size-skew"
            sizes = split_sizes_dirichlet(num_blocks, num_partitions, cfg.data.partition_alpha, cfg.train.seed + 1)
            partitioner = SizePartitioner([int(s) for s in sizes])
    partitioner.dataset = rows
    return partitioner


def _column(dataset: Any, column: str) -> np.ndarray:
    """An integer column of a `datasets.Dataset` as int64, read through Arrow (iterating a
    `Column` converts row by row: seconds for 10^5 rows)."""
    return dataset.with_format("arrow")[:].column(column).to_numpy().astype(np.int64)


def _partition_rows(partitioner: Partitioner, column: str) -> list[np.ndarray]:
    """`column` of every partition of `partitioner`, in partition order."""
    # NaturalIdPartitioner draws a tqdm bar on stderr while it indexes the ids: keep it out of
    # the client's log, pass anything else through
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        rows = [_column(partitioner.load_partition(k), column) for k in range(partitioner.num_partitions)]
    other = [
        line
        for line in re.split(r"[\r\n]", captured.getvalue())
        if line.strip() and not line.startswith("Generating partition_id_to_indices")
    ]
    if other:
        sys.stderr.write("\n".join(other) + "\n")
    return rows


def _partition(cfg: AppConfig, split: str, num_partitions: int) -> list[torch.Tensor]:
    """All partitions of the training split (uncapped), per `cfg.data.partitioner`."""
    tokens = tokenized_split(cfg, split)
    if cfg.data.partitioner == "articles":
        if tokens.num_articles < num_partitions:
            raise ValueError(
                f'partitioner "articles": {tokens.num_articles} articles in "{split}" '
                f"cannot cover {num_partitions} partitions"
            )
        owned = _partition_rows(make_partitioner(cfg, tokens, num_partitions), "article")
        parts = [
            pack_blocks(
                np.concatenate([tokens.ids[tokens.starts[a] : tokens.starts[a + 1]] for a in o]), cfg.data.block_size
            )
            for o in owned
        ]
    else:
        blocks = pack_blocks(tokens.ids, cfg.data.block_size)
        if len(blocks) < num_partitions:
            raise ValueError(
                f'{len(blocks)} blocks of {cfg.data.block_size} tokens in "{split}" '
                f"cannot cover {num_partitions} partitions"
            )
        owned = _partition_rows(make_partitioner(cfg, tokens, num_partitions), "block")
        parts = [blocks[torch.from_numpy(o)] for o in owned]
    for k, part in enumerate(parts):
        if len(part) == 0:
            raise ValueError(
                f"partition {k} of {num_partitions} has no block of `block-size` = "
                f"{cfg.data.block_size} tokens; use fewer partitions or a smaller block-size"
            )
    return parts


def load_partition(cfg: AppConfig, partition_id: int, num_partitions: int) -> torch.Tensor:
    """The training blocks of one client: int64 tensor (n_blocks, block_size).

    Partitions are disjoint and deterministic from `seed`; `max-train-blocks` caps each one
    (0 = all). The tensor is shared with the module cache: do not modify it in place.

    Raises
    ------
    ValueError
        `partition_id` is not in [0, num_partitions), or the split cannot cover the partitions.
    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id {partition_id} is out of range [0, {num_partitions})")
    split = resolve_train_split(cfg)
    key = (
        cfg.model.tokenizer or cfg.model.model,
        split,
        _source(cfg),
        cfg.data.partitioner,
        cfg.data.partition_alpha,
        cfg.train.seed,
        cfg.data.block_size,
        num_partitions,
    )
    if key not in _BLOCKS:
        _BLOCKS[key] = _partition(cfg, split, num_partitions)
    part = _BLOCKS[key][partition_id]
    return part[: cfg.data.max_train_blocks] if cfg.data.max_train_blocks > 0 else part


def joined_split(cfg: AppConfig, split: str) -> np.ndarray:
    """Token ids of `"\\n\\n".join(rows)` tokenized as one text: the stream of Hugging Face's
    "Perplexity of fixed-length models" guide (no eos tokens), cached in memory."""
    key = (cfg.model.tokenizer or cfg.model.model, split, _source(cfg), "joined")
    if key not in _SPLITS:
        text = "\n\n".join(read_lines(cfg, split))
        ids = np.asarray(_tokenizer(cfg)(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)
        _SPLITS[key] = TokenizedSplit(ids, np.asarray([0, len(ids)], dtype=np.int64))
    return _SPLITS[key].ids


def eval_token_stream(cfg: AppConfig) -> np.ndarray:
    """The whole `eval-split` as one token stream, built as `eval-stream` says: "articles" (the
    training stream: articles tokenized one by one, an eos after each) or "joined" (rows joined
    with blank lines and tokenized as one text, as Hugging Face's perplexity guide does)."""
    if cfg.data.eval_stream == "joined":
        return joined_split(cfg, cfg.data.eval_split)
    return tokenized_split(cfg, cfg.data.eval_split).ids


def load_eval_blocks(cfg: AppConfig) -> torch.Tensor:
    """The first `eval-max-blocks` blocks (0 = all) of `eval-split`: int64 (n, block_size)."""
    blocks = pack_blocks(eval_token_stream(cfg), cfg.data.block_size)
    if len(blocks) == 0:
        raise ValueError(
            f'`eval-split` "{cfg.data.eval_split}" has fewer than `block-size` = {cfg.data.block_size} tokens'
        )
    return blocks[: cfg.data.eval_max_blocks] if cfg.data.eval_max_blocks > 0 else blocks


def load_eval_stream(cfg: AppConfig) -> torch.Tensor:
    """The eval tokens of the sliding-window protocol (`eval-stride` > 0): int64 (n,), the first
    `eval-max-blocks` x `block-size` tokens of the stream (the same tokens as the blocks), or
    with `eval-max-blocks` = 0 the whole stream, its tail shorter than a block included."""
    ids = torch.as_tensor(eval_token_stream(cfg), dtype=torch.int64)
    cap = cfg.data.eval_max_blocks * cfg.data.block_size
    ids = ids[:cap] if cap > 0 else ids
    if len(ids) < 2:
        raise ValueError(f'`eval-split` "{cfg.data.eval_split}" has fewer than 2 tokens to evaluate on')
    return ids.clone()
