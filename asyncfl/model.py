"""GPT-2 models for asyncfl: build (Hub id, local folder or size preset), LoRA, trainable state.

Notes
-----
- Server and every client must start from bit-identical weights: with LoRA the frozen base
  never travels. Every random init (preset, random init of a config, LoRA adapters) therefore
  runs under `torch.random.fork_rng` seeded with `seed`, on CPU, so the global RNG is untouched.
- `trainable_state` is the one definition of "what travels": every parameter with
  `requires_grad` (tied `wte`/`lm_head` once) for full fine-tuning, only `lora_` tensors with LoRA.
- The Hub may be unreachable (air-gapped cluster, this sandbox). Instead of a stack trace after
  minutes of retries, `require_hub` fails within seconds with `HubUnavailableError` naming the
  run-config keys that make a run fully offline.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from asyncfl.config import AppConfig

log = logging.getLogger(__name__)

OFFLINE_HINT = (
    "run offline with local files via the keys `model-preset`, `tokenizer` and `data-dir`, e.g. "
    '--run-config \'model-preset="tiny" tokenizer="../shared/data/gpt2" '
    'data-dir="../shared/data/wikitext-2-raw"\', '
    "or set HF_HUB_OFFLINE=1 to use copies already in the local Hugging Face cache"
)
LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2 Conv1D layers: attention in/out, MLP in/out
_PRESETS = {  # from-scratch shapes; n_positions of "tiny" grows with block-size
    "tiny": dict(n_layer=2, n_embd=128, n_head=2, n_positions=128),
    "small": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024),
}
_HUB_TIMEOUT_S = 4.0


class HubUnavailableError(RuntimeError):
    """The Hugging Face Hub is needed (a Hub id was configured) but cannot be reached."""


# --------------------------------------------------------------------------------------------
# Hub access
# --------------------------------------------------------------------------------------------
def is_local_path(spec: str) -> bool:
    """True when `spec` names a local file/folder (existing, or written like a path)."""
    if Path(spec).expanduser().exists():
        return True
    # Hub ids are "name" or "org/name": anything else written like a path is a (missing) path.
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1


def _hub_offline_env() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_address() -> tuple[str, int]:
    """Host and port to probe: the HTTPS proxy when one is set, else the Hub endpoint."""
    from urllib.parse import urlparse

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)


def hub_reachable(timeout: float = _HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub (or the HTTPS proxy) opens within `timeout` seconds.

    DNS lookups have no timeout of their own, so the probe runs in a daemon thread.
    """
    result: list[bool] = []
    host, port = _hub_address()

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def hub_unavailable(key: str, value: str, cause: BaseException | None = None) -> HubUnavailableError:
    """The error raised when `key` = `value` needs the Hub and the Hub cannot be used."""
    host, port = _hub_address()
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return HubUnavailableError(
        f'`{key}` = "{value}" is a Hugging Face Hub id, but the Hub ({host}:{port}) cannot be '
        f"reached and no copy is in the local cache{why}. To fix: {OFFLINE_HINT}."
    )


def require_hub(key: str, value: str) -> None:
    """Raise `HubUnavailableError` fast when `value` (a Hub id set by `key`) cannot be fetched.

    With HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) set in the environment
    before start the libraries read their local cache, so no probe is made.
    """
    if not _hub_offline_env() and not hub_reachable():
        raise hub_unavailable(key, value)


def _from_hub_or_folder(key: str, spec: str, load: Any, **kwargs: Any) -> Any:
    """Call `load(spec, **kwargs)` for a local folder or a Hub id, failing fast when offline.

    Offline (HF_HUB_OFFLINE set, or the Hub unreachable) a Hub id is resolved to its snapshot
    in the local Hugging Face cache, which answers at once (transformers' own
    `local_files_only` still probes the Hub for an adapter config, with minutes of retries).
    """
    if is_local_path(spec):
        if not Path(spec).expanduser().exists():
            raise FileNotFoundError(f'`{key}` = "{spec}": no such file or folder (cwd {os.getcwd()})')
        return load(str(Path(spec).expanduser()), **kwargs)
    if _hub_offline_env() or not hub_reachable():
        from huggingface_hub import snapshot_download

        try:  # resolve to the cached snapshot folder; no network call at all
            folder = snapshot_download(repo_id=spec, local_files_only=True)
        except Exception as exc:  # LocalEntryNotFoundError and friends: not in the cache
            raise hub_unavailable(key, spec, exc) from exc
        return load(folder, **kwargs)
    return load(spec, **kwargs)


# --------------------------------------------------------------------------------------------
# Device, tokenizer, model
# --------------------------------------------------------------------------------------------
def resolve_device(cfg: AppConfig) -> torch.device:
    """The torch device for `cfg.model.device`: "auto" = CUDA when available, else CPU.

    Raises
    ------
    RuntimeError
        `device` is "cuda" but CUDA is not available.
    """
    if cfg.model.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.model.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError('run config `device` = "cuda" but CUDA is not available; use "auto" or "cpu"')
    return torch.device(cfg.model.device)


def build_tokenizer(cfg: AppConfig) -> Any:
    """The GPT-2 tokenizer named by `cfg.model.tokenizer` (or `cfg.model.model`), with pad = eos.

    Raises
    ------
    HubUnavailableError
        The name is a Hub id and the Hub cannot be reached.
    FileNotFoundError
        The name is a path that does not exist.
    """
    from transformers import AutoTokenizer

    key, spec = ("tokenizer", cfg.model.tokenizer) if cfg.model.tokenizer else ("model", cfg.model.model)
    tokenizer = _from_hub_or_folder(key, spec, AutoTokenizer.from_pretrained)
    if tokenizer.pad_token is None:  # GPT-2 has none; padding is only for convenience
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _seeded(seed: int, make: Any) -> Any:
    """Run `make()` with the CPU RNG seeded by `seed`, leaving the global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _base_model(cfg: AppConfig) -> torch.nn.Module:
    """The un-wrapped causal LM: preset from scratch, pretrained, or random init of a config."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if cfg.model.model_preset:
        shape: dict[str, Any] = dict(_PRESETS[cfg.model.model_preset])  # GPT2Config keyword arguments
        shape["n_positions"] = max(shape["n_positions"], cfg.data.block_size)
        config = GPT2Config(vocab_size=50257, **shape)
        return _seeded(cfg.train.seed, lambda: GPT2LMHeadModel(config))
    if not cfg.model.pretrained:
        config = _from_hub_or_folder("model", cfg.model.model, AutoConfig.from_pretrained)
        return _seeded(cfg.train.seed, lambda: AutoModelForCausalLM.from_config(config))
    try:
        return _from_hub_or_folder("model", cfg.model.model, AutoModelForCausalLM.from_pretrained)
    except OSError as exc:
        if is_local_path(cfg.model.model):  # e.g. a folder with config.json but no weights
            raise OSError(
                f'`model` = "{cfg.model.model}" holds no loadable weights ({exc}); set '
                "pretrained=false to random-init its config, or use `model-preset`"
            ) from exc
        raise


def build_model(cfg: AppConfig) -> torch.nn.Module:
    """Build the model described by `cfg`, on CPU in fp32, in train mode.

    `model-preset` "tiny"/"small" builds GPT-2 from scratch; else `model` is loaded (pretrained)
    or its config random-initialised. Every random init is seeded by `cfg.train.seed`, so two calls
    (in any process) give bit-identical weights. With `lora-rank` > 0 the model is wrapped
    with peft LoRA on `c_attn`, `c_proj`, `c_fc` and the base is frozen.

    Raises
    ------
    HubUnavailableError
        `model` is a Hub id and the Hub cannot be reached.
    ValueError
        `block-size` exceeds the model's context length.
    """
    model = _base_model(cfg)
    n_positions = getattr(model.config, "n_positions", None)
    if n_positions is not None and cfg.data.block_size > n_positions:
        raise ValueError(f"`block-size` = {cfg.data.block_size} exceeds the model's n_positions {n_positions}")
    if cfg.model.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.model.lora_rank,
            lora_alpha=cfg.model.lora_alpha,
            lora_dropout=cfg.model.lora_dropout,
            target_modules=LORA_TARGETS,
            fan_in_fan_out=True,
            task_type="CAUSAL_LM",
        )
        model = _seeded(cfg.train.seed + 1, lambda: get_peft_model(model, lora))
    return model.train()


# --------------------------------------------------------------------------------------------
# Trainable state: the tensors that travel
# --------------------------------------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module behind a `torch.compile` wrapper (names must not carry `_orig_mod.`)."""
    return getattr(model, "_orig_mod", model)


def _is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The named tensors that travel between server and clients.

    Full fine-tuning: every parameter with `requires_grad` (a tied weight such as GPT-2's
    `wte`/`lm_head` appears once, as `transformer.wte.weight`). LoRA: only the adapter
    tensors (names containing "lora_"). Names are module paths, identical in every process.

    Returns
    -------
    dict[str, torch.Tensor]
        Detached tensors that SHARE STORAGE with the live parameters (no copy): they change
        when the model trains. `clone()` them to keep a snapshot (e.g. before computing a delta).
    """
    model = _unwrap(model)
    lora = _is_lora(model)
    return {
        name: p.detach() for name, p in model.named_parameters() if p.requires_grad and (not lora or "lora_" in name)
    }


def load_trainable_state(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Copy `state` into the model's trainable tensors (dtype/device converted), strictly.

    Parameters
    ----------
    model : torch.nn.Module
        The model to update in place.
    state : Mapping[str, torch.Tensor | numpy.ndarray]
        Exactly the names of `trainable_state(model)`.

    Raises
    ------
    ValueError
        A name is missing or unexpected, or a shape differs; the message names the tensor.
    """
    target = trainable_state(model)
    missing = sorted(set(target) - set(state))
    extra = sorted(set(state) - set(target))
    if missing or extra:
        raise ValueError(
            f"trainable state mismatch: missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"({len(missing)}), unexpected {extra[:5]}{'...' if len(extra) > 5 else ''} ({len(extra)})"
        )
    with torch.no_grad():
        for name, dst in target.items():
            src = state[name]
            src = torch.from_numpy(np.asarray(src)) if not isinstance(src, torch.Tensor) else src
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"trainable tensor `{name}`: shape {tuple(src.shape)} does not match the model's {tuple(dst.shape)}"
                )
            dst.copy_(src)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    params = list(_unwrap(model).parameters())  # parameters() de-duplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_model(model: torch.nn.Module, tokenizer: Any, path: str | Path) -> Path:
    """Write the model with `save_pretrained` plus the tokenizer into the folder `path`.

    With LoRA the adapters are merged into a copy (`merge_and_unload`), so the folder holds a
    plain GPT-2 that `AutoModelForCausalLM.from_pretrained(path)` loads; the live model is
    left as it is.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    base: Any = _unwrap(model)  # a transformers PreTrainedModel, or a peft PeftModel with LoRA
    if _is_lora(base):
        base = copy.deepcopy(base).merge_and_unload()
    base.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
