"""The evaluation protocols: blocks, Hugging Face's strided sliding window, the token streams."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from asyncfl import data as D
from asyncfl import model as M
from asyncfl import train as T
from asyncfl.config import AppConfig, ConfigError


def scored_positions(wins):
    return [b + j for b, e, f in wins for j in range(f, e - b)]


def test_sliding_windows_hand_computed():
    # overlap: windows of 4 every 2 tokens over 10 tokens; each scores what the last did not reach
    wins = T.sliding_windows(10, window=4, stride=2)
    assert wins == [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert scored_positions(wins) == list(range(1, 10))  # every token but the first, once
    # stride = window: disjoint blocks, and a block's first token has no context in it
    wins = T.sliding_windows(10, window=4, stride=4)
    assert wins == [(0, 4, 1), (4, 8, 1), (8, 10, 1)]
    assert scored_positions(wins) == [1, 2, 3, 5, 6, 7, 9]
    # a stride that does not divide: the last window ends at the stream's end
    assert T.sliding_windows(11, window=4, stride=3) == [(0, 4, 1), (3, 7, 1), (6, 10, 1), (9, 11, 1)]
    with pytest.raises(ValueError, match=r"stride must be in \[1, window = 4\], got 5"):
        T.sliding_windows(10, window=4, stride=5)


def hf_guide_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The loop of Hugging Face's "Perplexity of fixed-length models", with the loss of each
    window weighted by its exact number of scored labels (the shifted, non -100 targets)."""
    seq_len = ids.numel()
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[None, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * scored
        n_tokens += scored
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("stride, batch", [(12, 3), (1, 16), (32, 2)])
def test_strided_eval_matches_the_hugging_face_loop(make_cfg, stride, batch):
    model = M.build_model(make_cfg(seed=5))
    model.eval()
    ids = torch.randint(0, 50257, (150,), generator=torch.Generator().manual_seed(2))
    want_loss, want_n = hf_guide_perplexity(model, ids, max_length=32, stride=stride)
    got = T.evaluate_strided(model, ids, window=32, stride=stride, batch_size=batch, device="cpu")
    assert got["tokens"] == want_n
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(want_loss), rel=1e-4)


def test_stride_equal_to_the_window_is_the_block_protocol(make_cfg):
    model = M.build_model(make_cfg(seed=1))
    blocks = torch.randint(0, 50257, (5, 32), generator=torch.Generator().manual_seed(3))
    got = T.evaluate_strided(model, blocks.reshape(-1), window=32, stride=32, batch_size=2, device="cpu")
    want = T.evaluate(model, blocks, batch_size=2, device="cpu")
    assert got["tokens"] == want["tokens"] == 5 * 31 and got["windows"] == 5
    for k in ("loss", "top1", "top5"):
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9)


class ContextOracle(torch.nn.Module):
    """A stand-in LM whose logit for the true next token is the number of tokens of context
    before it in the window (all other logits 0): its loss says which tokens were scored with
    how much context."""

    vocab = 50

    def forward(self, input_ids, use_cache=False):
        b, n = input_ids.shape
        logits = torch.zeros(b, n, self.vocab)
        context = torch.arange(1, n, dtype=torch.float32).expand(b, n - 1)[..., None]
        logits[:, :-1].scatter_(2, input_ids[:, 1:, None], context)
        return SimpleNamespace(logits=logits)


def oracle_nll(context: int) -> float:
    """-log softmax of the true token with logit `context` among 49 zeros."""
    return math.log(ContextOracle.vocab - 1 + math.exp(context)) - context


@pytest.mark.parametrize("batch", [1, 3])
def test_each_scored_token_gets_the_context_of_the_guide_hand_computed(batch):
    ids = torch.randint(0, ContextOracle.vocab, (10,), generator=torch.Generator().manual_seed(0))
    got = T.evaluate_strided(ContextOracle(), ids, window=4, stride=2, batch_size=batch, device="cpu")
    # windows (0,4) (2,6) (4,8) (6,10): tokens 1, 2, 3 with 1, 2, 3 tokens of context, then
    # each later window scores its last two tokens with 2 and 3 tokens of context
    want = (oracle_nll(1) + oracle_nll(2) + oracle_nll(3) + 3 * (oracle_nll(2) + oracle_nll(3))) / 9
    assert got["tokens"] == 9 and got["windows"] == 4
    assert got["loss"] == pytest.approx(want, rel=1e-6)
    assert got["top1"] == 1.0  # the true token always has the largest logit
    disjoint = T.evaluate_strided(ContextOracle(), ids, window=4, stride=4, batch_size=batch, device="cpu")
    # (0,4) (4,8) (8,10): contexts 1, 2, 3 | 1, 2, 3 | 1
    want = (2 * (oracle_nll(1) + oracle_nll(2) + oracle_nll(3)) + oracle_nll(1)) / 7
    assert disjoint["tokens"] == 7 and disjoint["loss"] == pytest.approx(want, rel=1e-6)


def test_eval_stream_cap_is_the_block_tokens_and_the_joined_stream_is_the_guides_text(make_cfg):
    cfg = make_cfg(eval_max_blocks=3, block_size=32)
    stream, blocks = D.load_eval_stream(cfg), D.load_eval_blocks(cfg)
    assert torch.equal(stream, blocks.reshape(-1))  # the same 96 tokens in both protocols
    whole = D.load_eval_stream(make_cfg(eval_max_blocks=0, block_size=32))
    assert len(whole) == len(D.tokenized_split(cfg, "test").ids)  # tail included
    joined_cfg = make_cfg(eval_stream="joined", eval_max_blocks=0)
    joined = D.eval_token_stream(joined_cfg)
    tok = D._tokenizer(joined_cfg)
    assert tok.eos_token_id not in set(joined.tolist())  # no article separators
    assert tok.decode(joined.tolist()) == "\n\n".join(D.read_lines(joined_cfg, "test"))


def test_eval_stride_longer_than_the_window_is_a_config_error():
    with pytest.raises(ConfigError, match=r"`eval-stride` must be 0 or in \[1, block-size = 64\].*got 65"):
        AppConfig.from_run_config({"block-size": 64, "eval-stride": 65})
    with pytest.raises(ConfigError, match="`eval-stream` must be one of 'articles', 'joined', got \"hf\""):
        AppConfig.from_run_config({"eval-stream": "hf"})
    assert AppConfig.from_run_config({"block-size": 64, "eval-stride": 64}).data.eval_stride == 64
