"""Low-rank compressors for model deltas (PCA, QRCP, CUR) and their Flower wire format.

Paper: Section 3 (linear approximation techniques in Algorithm 1).

Usage: ``c = get_compressor("pca", rank=10); record = c.encode_state(delta)`` on a client,
``decode_state(record, reference=shapes)`` on the server (any compressor's record).
"""

from __future__ import annotations

from asyncfl.choices import CompressorName, check_choice, choices

from .base import OPTION_NAMES, Compressor, CompressorOptions, should_compress
from .codec import COMPRESSORS, Payload, PayloadError, decode_state
from .cur import CURCompressor
from .identity import IdentityCompressor
from .pca import PCACompressor
from .qrcp import QRCPCompressor

_REGISTRY: dict[str, type[Compressor]] = {
    cls.name: cls for cls in (IdentityCompressor, PCACompressor, QRCPCompressor, CURCompressor)
}
if not tuple(_REGISTRY) == COMPRESSORS == choices(CompressorName):
    raise ImportError(
        f"compressors {tuple(_REGISTRY)} / codec {COMPRESSORS} are not "
        f"asyncfl.choices.CompressorName {choices(CompressorName)}"
    )


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
    check_choice("`compressor`", name, COMPRESSORS)
    return _REGISTRY[name](**options)


__all__ = [
    "COMPRESSORS",
    "OPTION_NAMES",
    "Compressor",
    "CompressorOptions",
    "Payload",
    "PayloadError",
    "CURCompressor",
    "IdentityCompressor",
    "PCACompressor",
    "QRCPCompressor",
    "decode_state",
    "get_compressor",
    "should_compress",
]
