"""The downlink update log: coefficients per version step, what each node holds, pruning."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from asyncfl.compressors import decode_state, get_compressor
from asyncfl.strategies.downlink import DownlinkLog


def payload(seed: int, shape=(64, 48), rank=4) -> ArrayRecord:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
    return get_compressor("pca", rank=rank, dtype="fp32").encode_state({"w": m})


def test_log_sums_the_coefficients_of_the_steps_a_node_missed():
    dl = DownlinkLog(dense_bytes=10**9)
    p = [payload(i) for i in range(4)]
    dl.sent(node=1, version=0)
    dl.sent(node=2, version=1)
    dl.add(p[0], 0.5, stepped=True, version_before=0)  # asgd: v0 -> v1
    dl.add(p[1], 0.25, stepped=False, version_before=1)  # fedbuff K=2: buffered ...
    dl.add(p[2], 0.75, stepped=True, version_before=1)  # ... then v1 -> v2 with both
    dl.add_round([p[3], p[0]], [0.1, 0.2], version_before=2)  # a round reusing p[0]'s record
    m1 = dl.message_for(1, 3)
    assert (m1.base, m1.target) == (0, 3) and len(m1.records) == 5
    assert m1.coefs == [0.5, 0.25, 0.75, 0.1, 0.2]
    m2 = dl.message_for(2, 2)
    assert m2.base == 1 and m2.coefs == [0.25, 0.75] and m2.records == [p[1], p[2]]
    assert dl.message_for(3, 3) is None  # never sent anything: full weights
    assert dl.message_for(2, 0) is None  # holds a newer version than asked


def test_rebuilt_weights_equal_the_server_steps():
    """x_3 rebuilt from x_0 and the log equals the server's x_3 applied step by step."""
    dl = DownlinkLog(dense_bytes=10**9)
    x = {"w": torch.randn(64, 48, dtype=torch.float64).float()}
    x0 = {k: v.clone() for k, v in x.items()}
    dl.sent(7, 0)
    for v, (seed, coef) in enumerate([(1, 0.3), (2, -0.7), (3, 1.1)]):
        rec = payload(seed)
        x["w"] += coef * decode_state(rec)["w"]
        dl.add(rec, coef, stepped=True, version_before=v)
    msg = dl.message_for(7, 3)
    rebuilt = x0["w"].double()
    for c, rec in zip(msg.coefs, msg.records):
        rebuilt += c * decode_state(rec)["w"].double()
    torch.testing.assert_close(rebuilt.float(), x["w"], rtol=1e-5, atol=1e-5)


def test_too_long_a_log_falls_back_to_the_full_weights_and_is_pruned():
    rec = payload(0)
    dl = DownlinkLog(dense_bytes=int(2.5 * rec.count_bytes()), max_fraction=1.0)
    dl.sent(1, 0)
    dl.sent(2, 0)
    for v in range(3):
        dl.add(payload(v), 1.0, stepped=True, version_before=v)
    assert dl.message_for(1, 2) is not None and dl.message_for(1, 3) is None  # 3 payloads > 2.5
    dl.sent(1, 3)
    dl.prune()  # node 2 still holds v0, but its log (3 payloads) is useless: steps 0.. go
    assert sorted(dl.steps) == [1, 2] and len(dl.payloads) == 2
    dl.sent(2, 3)
    dl.prune()  # both hold v3: nothing left to keep
    assert not dl.steps and not dl.payloads


def test_forget_means_full_weights_next():
    dl = DownlinkLog(dense_bytes=10**9)
    dl.sent(1, 0)
    dl.add(payload(0), 1.0, stepped=True, version_before=0)
    assert dl.message_for(1, 1) is not None
    dl.forget(1)
    assert dl.message_for(1, 1) is None
