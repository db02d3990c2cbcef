"""Low-rank compressors for model deltas (PCA, QRCP, CUR) and their Flower wire format.

Paper: Section 3 (linear approximation techniques in Algorithm 1).

Usage: ``c = get_compressor("pca", rank=10); record = c.encode_state(delta)`` on a client,
``decode_state(record, reference=shapes)`` on the server (any compressor's record).
"""

from __future__ import annotations

from .base import OPTION_NAMES, Compressor, CompressorOptions, should_compress
from .codec import COMPRESSORS, Payload, PayloadError, decode_state
from .cur import CURCompressor
from .identity import IdentityCompressor
from .pca import PCACompressor
from .qrcp import QRCPCompressor

_REGISTRY: dict[str, type[Compressor]] = {
    cls.name: cls for cls in (IdentityCompressor, PCACompressor, QRCPCompressor, CURCompressor)
}
assert tuple(_REGISTRY) == COMPRESSORS


def get_compressor(name: str, **options) -> Compressor:
    """Build a compressor by name.

    Parameters
    ----------
    name : str
        One of `COMPRESSORS`: "none", "pca", "qrcp", "cur".
    **options
        `CompressorOptions` fields: rank=10, method="randomized", dtype="fp16", energy=None,
        oversample=10, power_iters=2, row_select="pivoted", seed=0, min_ratio=1.0.

    Raises
    ------
    ValueError
        Unknown name, unknown option or bad option value (the message lists what is allowed).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; expected one of {COMPRESSORS}")
    return _REGISTRY[name](**options)


__all__ = [
    "COMPRESSORS", "OPTION_NAMES", "Compressor", "CompressorOptions", "Payload", "PayloadError",
    "CURCompressor", "IdentityCompressor", "PCACompressor", "QRCPCompressor",
    "decode_state", "get_compressor", "should_compress",
]
