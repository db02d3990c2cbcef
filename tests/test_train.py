"""Tests for asyncfl.train: metrics recomputed by hand, loss goes down, sampler, LoRA stays LoRA."""

from __future__ import annotations

import math

import pytest
import torch

from asyncfl import model as M
from asyncfl import train as T


def random_blocks(n: int, block_size: int, seed: int = 0, vocab: int = 50257) -> torch.Tensor:
    return torch.randint(0, vocab, (n, block_size), generator=torch.Generator().manual_seed(seed))


def test_evaluate_matches_manual_token_metrics(make_cfg):
    # Prepare: 5 blocks with an eval batch of 2 (the last batch is partial)
    model = M.build_model(make_cfg(seed=3))
    blocks = random_blocks(5, 32, seed=1)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1].double()  # (5, 31, V)
    target = blocks[:, 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    want_loss = -logp.mean().item()
    want_top1 = (logits.argmax(-1) == target).double().mean().item()
    # rank of the target = number of strictly larger logits; top-5 means rank < 5
    target_logit = logits.gather(-1, target.unsqueeze(-1))
    want_top5 = ((logits > target_logit).sum(-1) < 5).double().mean().item()
    model.train()
    # Execute
    got = T.evaluate(model, blocks, batch_size=2, device="cpu")
    # Assert
    assert got["tokens"] == 5 * 31
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(want_loss), rel=1e-4)
    assert got["top1"] == pytest.approx(want_top1, abs=1e-9)
    assert got["top5"] == pytest.approx(want_top5, abs=1e-9)
    assert model.training  # mode restored


def test_train_local_learns_a_small_repeated_set(make_cfg):
    # Prepare: two blocks over a 200-token vocabulary, seen 10 times each
    cfg = make_cfg(local_steps=10, batch_size=2, lr=3e-3)
    model = M.build_model(cfg)
    blocks = random_blocks(2, 32, seed=4, vocab=200)
    before = T.evaluate(model, blocks, batch_size=4, device="cpu")
    # Execute
    result = T.train_local(model, blocks, cfg, "cpu", generator_seed=0)
    # Assert: loss falls by far, and the memorised continuation is ranked first
    after = T.evaluate(model, blocks, batch_size=4, device="cpu")
    assert after["loss"] < before["loss"] - 2.0
    assert 0.5 < after["top1"] <= after["top5"] <= 1.0
    assert result.steps == 10 and result.samples == 20 and result.tokens == 20 * 32
    assert math.isfinite(result.loss) and result.loss < before["loss"]
    assert result.seconds > 0 and result.tokens_per_s == pytest.approx(result.tokens / result.seconds)


def test_epochs_mode_step_count(make_cfg):
    cfg = make_cfg(local_steps=0, local_epochs=2, batch_size=4)
    assert T.num_steps(cfg, 10) == 5  # ceil(2 * 10 / 4)
    assert T.num_steps(make_cfg(local_steps=7), 10) == 7


def test_batch_indices_walk_full_permutations():
    order = T.batch_indices(num_blocks=6, steps=5, batch_size=4, seed=9)
    assert order.shape == (5, 4)
    flat = order.flatten()
    for start in range(0, 18, 6):  # 20 draws = 3 full permutations + 2
        assert sorted(flat[start : start + 6].tolist()) == list(range(6))
    assert torch.equal(order, T.batch_indices(6, 5, 4, seed=9))
    assert not torch.equal(order, T.batch_indices(6, 5, 4, seed=10))


def test_lora_training_changes_only_adapters(make_cfg):
    cfg = make_cfg(lora_rank=4, local_steps=2, batch_size=2, lr=1e-2)
    model = M.build_model(cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: t.clone() for n, t in M.trainable_state(model).items()}
    T.train_local(model, random_blocks(4, 32), cfg, "cpu", generator_seed=0)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    after = M.trainable_state(model)
    assert any(not torch.equal(after[n], start[n]) for n in start)


def test_train_local_rejects_empty_blocks(make_cfg):
    with pytest.raises(ValueError, match="non-empty"):
        T.train_local(
            M.build_model(make_cfg()), torch.zeros(0, 32, dtype=torch.int64), make_cfg(), "cpu", generator_seed=0
        )
