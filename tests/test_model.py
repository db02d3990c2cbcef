"""Tests for asyncfl.model: deterministic builds, trainable state, LoRA, saving, offline errors."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from asyncfl import model as M

TOKENS = torch.arange(2 * 32).reshape(2, 32) * 97 % 50257  # fixed (2, 32) input


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def perturb_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA B starts at zero (adapter = identity); give it values so tests see the adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in M.trainable_state(model).values():
            t.add_(0.05 * torch.randn(t.shape, generator=g))


def test_tiny_builds_are_bit_identical_and_leave_global_rng_alone(make_cfg):
    # Prepare
    cfg = make_cfg(seed=7)
    rng_before = torch.get_rng_state()
    # Execute
    a, b = M.build_model(cfg), M.build_model(cfg)
    other = M.build_model(make_cfg(seed=8))
    # Assert
    assert torch.equal(torch.get_rng_state(), rng_before)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(sa[key], other.state_dict()[key])
    assert a.config.n_layer == 2 and a.config.n_embd == 128 and a.config.vocab_size == 50257


def test_tiny_n_positions_follows_block_size(make_cfg):
    assert M.build_model(make_cfg(block_size=32)).config.n_positions == 128
    assert M.build_model(make_cfg(block_size=256)).config.n_positions == 256


def test_full_trainable_state_lists_tied_weight_once(make_cfg):
    model = M.build_model(make_cfg())
    state = M.trainable_state(model)
    assert "transformer.wte.weight" in state
    assert not any(name.startswith("lm_head") for name in state)
    trainable, total = M.count_params(model)
    assert sum(t.numel() for t in state.values()) == trainable == total
    # No copy: the tensors alias the live parameters.
    assert state["transformer.wte.weight"].data_ptr() == model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_trainable_state_round_trip_reproduces_logits(make_cfg, lora_rank):
    # Prepare: a "client" model whose trainable state differs from a fresh build
    cfg = make_cfg(lora_rank=lora_rank)
    trained = M.build_model(cfg)
    perturb_lora(trained, seed=1)
    sent = {k: v.clone() for k, v in M.trainable_state(trained).items()}
    fresh = M.build_model(cfg)
    assert not torch.allclose(logits_of(fresh), logits_of(trained))
    # Execute
    M.load_trainable_state(fresh, sent)
    # Assert
    got = M.trainable_state(fresh)
    assert got.keys() == sent.keys() and all(torch.equal(got[k], sent[k]) for k in sent)
    torch.testing.assert_close(logits_of(fresh), logits_of(trained), rtol=0, atol=0)


def test_load_trainable_state_is_strict(make_cfg):
    model = M.build_model(make_cfg())
    state = {k: v.clone() for k, v in M.trainable_state(model).items()}
    missing = dict(state)
    missing.pop("transformer.wpe.weight")
    with pytest.raises(ValueError, match="transformer.wpe.weight"):
        M.load_trainable_state(model, missing)
    with pytest.raises(ValueError, match="bogus"):
        M.load_trainable_state(model, {**state, "bogus": torch.zeros(1)})
    bad = {**state, "transformer.ln_f.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"transformer\.ln_f\.bias.*\(3,\)"):
        M.load_trainable_state(model, bad)
    # numpy arrays (as an ArrayRecord gives them) load too
    M.load_trainable_state(model, {k: v.numpy() for k, v in state.items()})


def test_lora_sends_only_adapters_and_freezes_base(make_cfg):
    model = M.build_model(make_cfg(lora_rank=4))
    state = M.trainable_state(model)
    # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per layer, 2 layers, A and B each
    assert len(state) == 2 * 4 * 2
    assert all("lora_" in name for name in state)
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
    trainable, total = M.count_params(model)
    assert trainable == sum(t.numel() for t in state.values()) < total
    # LoRA init is seeded too: a second build sends the same adapters
    again = M.trainable_state(M.build_model(make_cfg(lora_rank=4)))
    assert all(torch.equal(state[k], again[k]) for k in state)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_save_model_loads_with_auto_model(make_cfg, tokenizer_dir, tmp_path, lora_rank):
    # Prepare
    cfg = make_cfg(lora_rank=lora_rank)
    model = M.build_model(cfg)
    perturb_lora(model, seed=2)
    tokenizer = M.build_tokenizer(cfg)
    # Execute
    M.save_model(model, tokenizer, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    # Assert
    assert not any("lora" in k for k in loaded.state_dict())
    assert (tmp_path / "out" / "vocab.json").is_file() or (tmp_path / "out" / "tokenizer.json").is_file()
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=1e-4, atol=1e-4)
    if lora_rank:  # the live model keeps its adapters
        assert all("lora_" in k for k in M.trainable_state(model))


def test_tokenizer_pads_with_eos(make_cfg):
    tok = M.build_tokenizer(make_cfg())
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_resolve_device(make_cfg):
    assert M.resolve_device(make_cfg(device="cpu")) == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert M.resolve_device(make_cfg(device="auto")).type == want


def test_missing_local_folder_and_weightless_folder(make_cfg, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        M.build_tokenizer(make_cfg(tokenizer="./no-such-tokenizer"))
    # shared/data/gpt2 has a config but no weights
    with pytest.raises(OSError, match="pretrained=false"):
        M.build_model(make_cfg(model_preset="", model=str(tokenizer_dir), pretrained=True))


@pytest.mark.parametrize("what", ["tokenizer", "model"])
def test_hub_unreachable_fails_fast_naming_offline_keys(make_cfg, monkeypatch, what):
    # Prepare: a Hub id, no offline mode; the Hub cannot be reached from the test machine
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    if M.hub_reachable(timeout=2.0):
        pytest.skip("the Hugging Face Hub is reachable from here")
    cfg = make_cfg(model_preset="", model="gpt2", tokenizer="")
    build = M.build_tokenizer if what == "tokenizer" else M.build_model
    # Execute
    start = time.perf_counter()
    with pytest.raises(M.HubUnavailableError) as info:
        build(cfg)
    # Assert
    assert time.perf_counter() - start < 30
    message = str(info.value)
    for key in ("`model`", "model-preset", "tokenizer", "data-dir", "HF_HUB_OFFLINE"):
        assert key in message


def test_hub_offline_env_cache_miss_is_hub_unavailable(make_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(M.HubUnavailableError, match="model-preset"):
        M.build_tokenizer(make_cfg(model_preset="", model="gpt2-never-cached", tokenizer=""))
    assert time.perf_counter() - start < 30
