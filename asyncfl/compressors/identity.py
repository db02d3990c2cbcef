"""The uncompressed baseline: every tensor travels dense, bit-exact, in its own dtype.

Paper: the FedAvg setting of Section 4 (clients send full parameter updates).

Notes
- Same interface and record format as the low-rank compressors (kind "dense" for every
  tensor), so tests and the server treat it like any other compressor.
- Options are accepted and validated but have no effect.
"""

from __future__ import annotations

from .base import Compressor


class IdentityCompressor(Compressor):
    """Send every tensor raw (the baseline every test tries first)."""

    name = "none"
    compresses = False
