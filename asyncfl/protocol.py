"""What the server and the client both read off a task message (no torch, no flwr).

`UpdateLog` is the update-log downlink's task body (`asyncfl.strategies.downlink` explains
it): the server builds it from the payloads it applied, the client's worker rebuilds the
global weights from it. It lives here, below both sides, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UpdateLog:
    """The global weights of version `target` as the weights of `base` plus
    sum_i coefs[i] * decode(records[i]): built by the server
    (`asyncfl.strategies.downlink.DownlinkLog.message_for`), applied by the client's worker
    (`asyncfl.client.worker.Worker.run_task`), which must hold the weights of `base`."""

    base: int
    coefs: list[float]
    records: list  # payload ArrayRecords, or (client side, deployment) their decoded wire data
    target: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the payloads (server side: their ArrayRecords)."""
        return sum(r.count_bytes() for r in self.records)
