"""Staleness functions and server update rules: hand-computed values on tiny tensors."""

from __future__ import annotations

import copy
import heapq
import io
import math
import random
import statistics

import pytest
import torch

from asyncfl.client.state import ClientShift
from asyncfl.strategies import (
    ASGD,
    FADAS,
    RULES,
    SAGA,
    Applied,
    DelayedNesterov,
    FedAsync,
    FedAvg,
    FedBuff,
    Page,
    SagaEstimator,
    ServerMomentum,
    Shifted,
    fedavg_mean,
    make_rule,
    make_staleness_fn,
)

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def state(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tensors.items()}


def assert_state(x: dict[str, torch.Tensor], **expected: torch.Tensor) -> None:
    assert set(x) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(x[k], v.to(x[k].dtype), rtol=1e-12, atol=1e-12)


def random_updates(seed: int, steps: int, nodes: int = 3) -> list[tuple[int, int, dict]]:
    """(node, staleness, update) triples over a two-tensor state."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            int(torch.randint(nodes, (1,), generator=g)),
            int(torch.randint(5, (1,), generator=g)),
            {"w": torch.randn(2, 3, generator=g, dtype=F64), "b": torch.randn(3, generator=g, dtype=F64)},
        )
        for _ in range(steps)
    ]


def fresh_x() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=F64).view(2, 3), "b": torch.ones(3, dtype=F64)}


RULE_KWARGS = {
    "fedasync": dict(alpha=0.6, staleness_fn=make_staleness_fn("polynomial", 0.5, 0)),
    "fedbuff": dict(buffer_size=3, server_lr=0.7, staleness_fn=make_staleness_fn("hinge", 1, 1)),
    "asgd": dict(server_lr=0.3, delay_adaptive=True, concurrency=2),
    "shifted": dict(server_lr=0.2, shift_alpha=0.5, num_clients=3),
    "saga": dict(server_lr=0.4),
    "dn": dict(buffer_size=2, server_lr=0.5, momentum=0.8, staleness_fn=make_staleness_fn("polynomial", 0.5, 0)),
    "fadas": dict(buffer_size=2, server_lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, tau_c=2),
    "saga-est": dict(server_lr=0.4),
    "page": dict(server_lr=0.4),
}


# ---------------------------------------------------------------------------------------------
# staleness functions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0, 1, 5, 1000])
def test_constant_staleness_is_one(tau):
    assert make_staleness_fn("constant", 0.5, 4)(tau) == 1.0


@pytest.mark.parametrize(
    ("a", "tau", "expected"),
    [(0.5, 0, 1.0), (0.5, 3, 0.5), (0.5, 8, 1 / 3), (1.0, 1, 0.5), (1.0, 9, 0.1), (0.0, 7, 1.0)],
)
def test_polynomial_staleness(a, tau, expected):
    assert make_staleness_fn("polynomial", a, 0)(tau) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("tau", "expected"), [(0, 1.0), (4, 1.0), (5, 1 / 1.5), (6, 0.5), (10, 0.25)])
def test_hinge_staleness(tau, expected):
    # s = 1 for tau <= b = 4, then 1 / (a (tau - b) + 1) with a = 0.5
    assert make_staleness_fn("hinge", 0.5, 4)(tau) == pytest.approx(expected, rel=1e-12)


def test_staleness_rejects_bad_kind_params_and_taus():
    with pytest.raises(ValueError, match="`staleness` must be one of 'constant', 'polynomial', 'hinge', got 'linear'"):
        make_staleness_fn("linear", 0.5, 4)
    with pytest.raises(ValueError, match="`a`"):
        make_staleness_fn("polynomial", -0.1, 0)
    with pytest.raises(ValueError, match="`b`"):
        make_staleness_fn("hinge", 1.0, -1)
    s = make_staleness_fn("polynomial", 0.5, 0)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="staleness"):
            s(bad)


# ---------------------------------------------------------------------------------------------
# fedasync, fedbuff, asgd
# ---------------------------------------------------------------------------------------------
def test_fedasync_without_base_moves_by_a_times_update():
    # Prepare: a = alpha * s(tau) = 0.5 * 1
    x, rule = state(w=t(1, 2)), FedAsync(alpha=0.5)
    # Execute
    applied = rule.apply(x, {"w": t(2, -2)}, staleness=3, node=0)
    # Assert: x + a * update = [1 + 1, 2 - 1]
    assert_state(x, w=t(2, 1))
    assert (applied.weight, applied.stepped) == (0.5, True)


def test_fedasync_with_base_mixes_toward_the_client_model():
    # Prepare: x_client = base + update = [2, 4]; a = 0.5 * (1 + 1)^-1 = 0.25
    x = state(w=t(4, 4))
    rule = FedAsync(alpha=0.5, staleness_fn=make_staleness_fn("polynomial", 1.0, 0))
    # Execute
    applied = rule.apply(x, {"w": t(2, 2)}, staleness=1, node=0, base={"w": t(0, 2)})
    # Assert: 0.75 * [4, 4] + 0.25 * [2, 4]
    assert_state(x, w=t(3.5, 4.0))
    assert applied.weight == 0.25
    assert FedAsync.needs_base and not any(make_rule(n, **RULE_KWARGS[n]).needs_base for n in RULES if n != "fedasync")


def test_fedbuff_k2_applies_staleness_weighted_sum_over_k():
    x = state(w=t(0, 0))
    rule = FedBuff(buffer_size=2, server_lr=1.0, staleness_fn=make_staleness_fn("polynomial", 1.0, 0))
    first = rule.apply(x, {"w": t(2, 0)}, staleness=0, node=0)  # s = 1
    assert_state(x, w=t(0, 0))  # no step before K arrivals
    assert (first.stepped, first.weight) == (False, 0.5)
    second = rule.apply(x, {"w": t(0, 4)}, staleness=3, node=1)  # s = 1/4
    # (1/2) * ([2, 0] + 0.25 * [0, 4]) = [1, 0.5]
    assert_state(x, w=t(1, 0.5))
    assert (second.stepped, second.weight, rule.count) == (True, 0.125, 0)


def test_fedbuff_k3_then_flush_of_a_partial_buffer():
    x, rule = state(w=t(0)), FedBuff(buffer_size=3, server_lr=0.5)
    assert not rule.apply(x, {"w": t(3)}, staleness=0, node=0).stepped
    assert not rule.apply(x, {"w": t(6)}, staleness=2, node=1).stepped
    assert_state(x, w=t(0))
    assert rule.apply(x, {"w": t(9)}, staleness=1, node=2).stepped
    assert_state(x, w=t(3))  # 0.5 * (3 + 6 + 9) / 3
    rule.apply(x, {"w": t(1)}, staleness=0, node=0)
    rule.apply(x, {"w": t(2)}, staleness=0, node=1)
    flushed = rule.flush(x)
    assert_state(x, w=t(3.75))  # + 0.5 * (1 + 2) / 2
    assert (flushed.weight, flushed.stepped) == (0.25, True)
    assert rule.flush(x) == type(flushed)(0.0, False)
    assert_state(x, w=t(3.75))


def test_fedbuff_with_k1_is_asgd_and_fedasync_without_base_is_asgd():
    s = make_staleness_fn("polynomial", 0.5, 0)
    ups = random_updates(0, 12)
    xb, xa, xs = fresh_x(), fresh_x(), fresh_x()
    buff, fasync = FedBuff(1, 0.3, s), FedAsync(0.3, s)
    for node, tau, u in ups:
        buff.apply(xb, u, staleness=tau, node=node)
        fasync.apply(xa, u, staleness=tau, node=node)
        ASGD(server_lr=0.3 * s(tau)).apply(xs, u, staleness=tau, node=node)
    for k in xs:
        torch.testing.assert_close(xb[k], xs[k], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(xa[k], xs[k], rtol=1e-14, atol=1e-14)


def test_asgd_plain_and_delay_adaptive_steps():
    x = state(w=t(1))
    assert ASGD(server_lr=0.5).apply(x, {"w": t(2)}, staleness=8, node=0).weight == 0.5
    assert_state(x, w=t(2))
    rule = ASGD(server_lr=0.5, delay_adaptive=True, concurrency=2)
    # gamma_t = gamma while tau <= concurrency, gamma * concurrency / tau after
    assert [rule.step_size(tau) for tau in (0, 1, 2, 4, 8)] == [0.5, 0.5, 0.5, 0.25, 0.125]
    applied = rule.apply(x, {"w": t(8)}, staleness=8, node=1)
    assert_state(x, w=t(3))
    assert applied.weight == 0.125


def test_balance_scales_hand_computed_and_asgd_node_scale():
    from asyncfl.strategies.rules import balance_scales

    # task times 1, 1, 2, 4 s: rates 1, 1, 0.5, 0.25, mean 0.6875 -> factors mean / rate
    scales = balance_scales({10: 1.0, 11: 1.0, 12: 2.0, 13: 4.0}, limit=4)
    assert scales == pytest.approx({10: 0.6875, 11: 0.6875, 12: 1.375, 13: 2.75})
    # every node's updates per second x factor is the same: its data counts equally,
    # and the total step per second is unchanged
    rates = {10: 1.0, 11: 1.0, 12: 0.5, 13: 0.25}
    assert {n: rates[n] * f for n, f in scales.items()} == pytest.approx({n: 0.6875 for n in rates})
    assert sum(rates[n] * f for n, f in scales.items()) == pytest.approx(sum(rates.values()))
    # clipped to [1/limit, limit]; nodes without a usable time get no factor
    # (rates 1 and 0.01, mean 0.505: node 2's 50.5 is clipped to 2)
    assert balance_scales({1: 1.0, 2: 100.0}, limit=2) == pytest.approx({1: 0.505, 2: 2.0})
    assert balance_scales({1: 0.0, 2: float("nan")}, limit=4) == {}
    # ASGD multiplies its step (after the delay-adaptive shrink) by the node's factor
    rule = ASGD(server_lr=0.5, delay_adaptive=True, concurrency=2)
    rule.node_scale = {7: 2.0}
    assert rule.step_size(4, node=7) == 0.5 * (2 / 4) * 2.0 and rule.step_size(4, node=8) == 0.25
    x = state(w=t(1))
    assert rule.apply(x, {"w": t(2)}, staleness=1, node=7).weight == 1.0
    assert_state(x, w=t(3))


# ---------------------------------------------------------------------------------------------
# shifted (Algorithm 2) and ClientShift
# ---------------------------------------------------------------------------------------------
def test_shifted_hand_computed_steps_use_h_before_the_shift_update():
    # gamma = 1, alpha = 0.5, n = 2
    x, rule = state(w=t(0)), Shifted(server_lr=1.0, shift_alpha=0.5, num_clients=2)
    rule.apply(x, {"w": t(2)}, staleness=0, node=0)  # x = 0 + (0 + 2); h0 = 1, h = 0.5
    assert_state(x, w=t(2))
    rule.apply(x, {"w": t(4)}, staleness=1, node=1)  # x = 2 + (0.5 + 4); h1 = 2, h = 1.5
    assert_state(x, w=t(6.5))
    rule.apply(x, {"w": t(-2)}, staleness=1, node=0)  # x = 6.5 + (1.5 - 2); h0 = 0, h = 1
    assert_state(x, w=t(6.0))
    sd = rule.state_dict()
    assert_state(sd["h"], w=t(1.0))
    assert_state(sd["shifts"][0], w=t(0.0))
    assert_state(sd["shifts"][1], w=t(2.0))


def test_shifted_identity_alpha0_equals_asgd_exactly():
    ups = random_updates(1, 20)
    xs, xa = fresh_x(), fresh_x()
    shifted, asgd = Shifted(0.3, 0.0, num_clients=3), ASGD(0.3)
    clients = {i: ClientShift(0.0) for i in range(3)}
    for node, tau, delta in ups:
        decoded = clients[node].residual(delta)  # identity compressor
        clients[node].update(decoded)
        shifted.apply(xs, decoded, staleness=tau, node=node)
        asgd.apply(xa, delta, staleness=tau, node=node)
    for k in xs:
        assert torch.equal(xs[k], xa[k])


def test_shifted_identity_alpha1_is_saga_algorithm4_and_h_stays_the_mean():
    # With C = identity and alpha = 1, h_i is node i's last delta u_i, and
    # x += gamma (u_new - u_i_old + (1/n) sum_j u_j_old): SAGA (seed notes, Algorithm 4).
    n, gamma, ups = 3, 0.25, random_updates(2, 25)
    x, x_ref = fresh_x(), fresh_x()
    rule, clients = Shifted(gamma, 1.0, num_clients=n), {i: ClientShift(1.0) for i in range(n)}
    last = {i: {k: torch.zeros_like(v) for k, v in x.items()} for i in range(n)}
    for node, tau, delta in ups:
        decoded = clients[node].residual(delta)
        clients[node].update(decoded)
        rule.apply(x, decoded, staleness=tau, node=node)
        for k in x_ref:
            mean_old = sum(last[j][k] for j in range(n)) / n
            x_ref[k] += gamma * (delta[k] - last[node][k] + mean_old)
        last[node] = delta
    for k in x:
        torch.testing.assert_close(x[k], x_ref[k], rtol=1e-12, atol=1e-12)
    sd = rule.state_dict()
    for k in x:  # h = (1/n) sum_i h_i, and the server's h_i equals the client's
        torch.testing.assert_close(sd["h"][k], sum(sd["shifts"][i][k] for i in range(n)) / n)
        for i in range(n):
            torch.testing.assert_close(sd["shifts"][i][k], clients[i].h[k])


def test_shifted_grows_and_forgets_members_keeping_h_the_mean():
    rule, x = Shifted(1.0, 1.0, num_clients=2), state(w=t(0))
    for node, value in ((0, 3.0), (1, 6.0), (2, 9.0)):  # node 2 is a third member
        rule.apply(x, {"w": t(value)}, staleness=0, node=node)
    assert rule.num_clients == 3
    assert_state(rule.state_dict()["h"], w=t(6.0))  # (3 + 6 + 9) / 3
    rule.forget(0)
    assert rule.num_clients == 2
    assert_state(rule.state_dict()["h"], w=t(7.5))  # (6 + 9) / 2
    rule.forget(0)  # unknown now, all members reported: no-op
    assert rule.num_clients == 2


def _topk(v: torch.Tensor, k: int = 6) -> torch.Tensor:
    flat = v.flatten()
    out = torch.zeros_like(flat)
    idx = flat.abs().topk(k).indices
    out[idx] = flat[idx]
    return out.view_as(v)


def _rank1(v: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(v, full_matrices=False)
    return s[0] * torch.outer(u[:, 0], vh[0])


def _async_quadratic(rule_name: str, compress, steps: int = 500):
    """Workers i = 0..2 minimise f_i(x) = 1/2 ||A_i x - b_i||^2 with fixed, unequal delays.

    Returns the compression errors ||C(r) - r|| per update and ||x_T - x*||.
    """
    g = torch.Generator().manual_seed(0)
    n, shape = 3, (5, 6)
    A = [torch.randn(40, 30, generator=g, dtype=F64) / 40**0.5 for _ in range(n)]
    b = [torch.randn(40, generator=g, dtype=F64) for _ in range(n)]
    x = {"w": torch.zeros(shape, dtype=F64)}
    if rule_name == "shifted":
        rule, alpha = Shifted(server_lr=0.1, shift_alpha=1.0, num_clients=n), 1.0
    else:
        rule, alpha = ASGD(server_lr=0.1), 0.0
    clients = [ClientShift(alpha) for _ in range(n)]
    delays, version, errors = [1.0, 2.3, 3.7], 0, []
    queue = [(delays[i], i, x["w"].clone(), 0) for i in range(n)]  # (finish time, node, x, v)
    while version < steps:
        now, i, x_seen, v_seen = heapq.heappop(queue)
        delta = -(A[i].T @ (A[i] @ x_seen.flatten() - b[i])).view(shape)  # -grad f_i
        residual = clients[i].residual({"w": delta})["w"]
        decoded = compress(residual)
        errors.append(float((decoded - residual).norm()))
        clients[i].update({"w": decoded})
        rule.apply(x, {"w": decoded}, staleness=version - v_seen, node=i)
        version += 1
        heapq.heappush(queue, (now + delays[i], i, x["w"].clone(), version))
    hess = sum(a.T @ a for a in A)
    x_star = torch.linalg.solve(hess, sum(a.T @ bb for a, bb in zip(A, b)))
    return errors, float((x["w"].flatten() - x_star).norm())


@pytest.mark.parametrize("compress", [_topk, _rank1], ids=["top6", "rank1-svd"])
def test_shifts_make_the_compression_error_fade_while_plain_compressed_asgd_keeps_it(compress):
    # Execute
    shifted_err, shifted_dist = _async_quadratic("shifted", compress)
    plain_err, plain_dist = _async_quadratic("asgd", compress)
    # Assert: with shifts the compressed residual -> 0 (h_i -> -grad f_i(x*)); without them
    # the error stays of the order of the heterogeneous gradients grad f_i(x*) != 0.
    first, last = statistics.mean(shifted_err[:50]), statistics.mean(shifted_err[-50:])
    assert last < 1e-4 * first
    assert shifted_dist < 1e-4
    assert statistics.mean(plain_err[-50:]) > 0.5 * statistics.mean(plain_err[:50])
    assert plain_dist > 0.1


def test_client_shift_residual_update_and_disk_round_trip(tmp_path):
    shift = ClientShift(shift_alpha=0.5)
    delta = {"w": t(4, 2)}
    assert shift.residual(delta)["w"] is delta["w"]  # h_i = 0: nothing to subtract
    shift.update({"w": t(4, 2)})  # h = [2, 1]
    assert_state(shift.residual({"w": t(1, 1)}), w=t(-1, 0))
    path = tmp_path / "shift.pt"
    shift.save(path)
    other = ClientShift(shift_alpha=0.5)
    assert other.load(path)
    assert_state(other.h, w=t(2, 1))
    assert not ClientShift(0.5).load(tmp_path / "missing.pt", missing_ok=True)
    with pytest.raises(FileNotFoundError):
        ClientShift(0.5).load(tmp_path / "missing.pt")
    assert isinstance(torch.load(path, weights_only=True)["w"], torch.Tensor)


# ---------------------------------------------------------------------------------------------
# saga (Algorithm 5)
# ---------------------------------------------------------------------------------------------
def test_saga_steps_with_the_mean_of_the_latest_updates():
    x, rule = state(w=t(0)), SAGA(server_lr=1.0)
    assert rule.apply(x, {"w": t(2)}, staleness=0, node=0).weight == 1.0  # mean(2) = 2
    assert_state(x, w=t(2))
    assert rule.apply(x, {"w": t(4)}, staleness=0, node=1).weight == 0.5  # mean(2, 4) = 3
    assert_state(x, w=t(5))
    rule.apply(x, {"w": t(0)}, staleness=1, node=0)  # table {0: 0, 1: 4}: mean 2
    assert_state(x, w=t(7))
    rule.forget(1)
    rule.apply(x, {"w": t(1)}, staleness=0, node=0)  # table {0: 1}: mean 1
    assert_state(x, w=t(8))


def test_saga_running_sum_matches_a_recomputed_mean():
    x, x_ref, rule, table = fresh_x(), fresh_x(), SAGA(0.2), {}
    for node, tau, u in random_updates(3, 30, nodes=4):
        rule.apply(x, u, staleness=tau, node=node)
        table[node] = u
        for k in x_ref:
            x_ref[k] += 0.2 * sum(v[k] for v in table.values()) / len(table)
    for k in x:
        torch.testing.assert_close(x[k], x_ref[k], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# shared contract: validation, no mutation of inputs, checkpoints, registry
# ---------------------------------------------------------------------------------------------
BAD_UPDATES = [
    ({"w": torch.zeros(2, 3, dtype=F64)}, "missing \\['b'\\]"),
    (
        {"w": torch.zeros(2, 3, dtype=F64), "b": torch.zeros(3, dtype=F64), "extra": torch.zeros(1)},
        "unexpected \\['extra'\\]",
    ),
    ({"w": torch.zeros(3, 2, dtype=F64), "b": torch.zeros(3, dtype=F64)}, "'w'.*shape"),
    ({"w": torch.zeros(2, 3, dtype=F64), "b": [0.0, 0.0, 0.0]}, "'b'.*must be a tensor"),
]


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize(("bad", "message"), BAD_UPDATES)
def test_rules_reject_bad_updates_without_touching_x_or_their_state(name, bad, message):
    # Prepare: two identical rules with the same history
    warm, after = random_updates(4, 4), random_updates(5, 5)
    rule, twin = make_rule(name, **RULE_KWARGS[name]), make_rule(name, **RULE_KWARGS[name])
    x, x_twin = fresh_x(), fresh_x()
    for node, tau, u in warm:
        rule.apply(x, u, staleness=tau, node=node)
        twin.apply(x_twin, u, staleness=tau, node=node)
    before = copy.deepcopy(x)
    # Execute / Assert: the bad update raises naming the tensor and changes nothing
    with pytest.raises(ValueError, match=message):
        rule.apply(x, bad, staleness=1, node=1)
    with pytest.raises(ValueError, match="staleness"):
        rule.apply(x, after[0][2], staleness=-1, node=1)
    assert all(torch.equal(x[k], before[k]) for k in x)
    for node, tau, u in after:  # the rule state is untouched too
        rule.apply(x, u, staleness=tau, node=node)
        twin.apply(x_twin, u, staleness=tau, node=node)
    rule.flush(x), twin.flush(x_twin)
    assert all(torch.equal(x[k], x_twin[k]) for k in x)


def test_fedasync_rejects_a_bad_base_without_touching_x():
    x, before = fresh_x(), fresh_x()
    update = {k: torch.ones_like(v) for k, v in x.items()}
    with pytest.raises(ValueError, match="base\\['b'\\]"):
        FedAsync(0.5).apply(x, update, staleness=0, node=0, base={"w": x["w"], "b": t(1)})
    assert all(torch.equal(x[k], before[k]) for k in x)


@pytest.mark.parametrize("name", RULES)
def test_rules_never_mutate_the_update(name):
    rule, x = make_rule(name, **RULE_KWARGS[name]), fresh_x()
    ups = random_updates(6, 7)
    kept = copy.deepcopy(ups)
    for node, tau, u in ups:
        rule.apply(x, u, staleness=tau, node=node)
    for (_, _, u), (_, _, k) in zip(ups, kept):
        assert all(torch.equal(u[n], k[n]) for n in u)


@pytest.mark.parametrize("name", RULES)
def test_state_dict_round_trip_continues_identically(name):
    # Prepare: 4 updates (a FedBuff K=3 buffer holds one), checkpoint through torch.save
    rule, x = make_rule(name, **RULE_KWARGS[name]), fresh_x()
    for node, tau, u in random_updates(7, 4):
        rule.apply(x, u, staleness=tau, node=node)
    buf = io.BytesIO()
    torch.save({"rule": rule.state_dict(), "x": x}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # tensors and plain values only
    restored = make_rule(name, **RULE_KWARGS[name])
    restored.load_state_dict(saved["rule"])
    x_restored = saved["x"]
    # Execute: both continue with the same updates
    for node, tau, u in random_updates(8, 8):
        a = rule.apply(x, u, staleness=tau, node=node)
        b = restored.apply(x_restored, u, staleness=tau, node=node)
        assert a == b
    rule.flush(x), restored.flush(x_restored)
    # Assert
    for k in x:
        torch.testing.assert_close(x[k], x_restored[k], rtol=1e-13, atol=1e-13)


def test_make_rule_registry_errors():
    with pytest.raises(
        ValueError,
        match="`rule` must be one of 'fedasync', 'fedbuff', 'asgd', 'dn', 'fadas', "
        "'shifted', 'saga', 'saga-est', 'page', 'fedavg', got 'fedprox'",
    ):
        make_rule("fedprox", server_lr=1.0)
    with pytest.raises(ValueError, match="accepted arguments: server_lr, delay_adaptive"):
        make_rule("asgd", server_lr=1.0, beta=0.9)
    with pytest.raises(ValueError, match="missing"):
        make_rule("fedbuff", server_lr=1.0)
    for name, kwargs, field in [
        ("fedasync", dict(alpha=0.0), "alpha"),
        ("fedasync", dict(alpha=1.5), "alpha"),
        ("fedbuff", dict(buffer_size=0, server_lr=1.0), "buffer_size"),
        ("asgd", dict(server_lr=-1.0), "server_lr"),
        ("asgd", dict(server_lr=math.inf), "server_lr"),
        ("asgd", dict(server_lr=1.0, concurrency=0), "concurrency"),
        ("shifted", dict(server_lr=1, shift_alpha=2, num_clients=2), "shift_alpha"),
        ("shifted", dict(server_lr=1, shift_alpha=1, num_clients=0), "num_clients"),
        ("asgd", dict(server_lr=1.0, momentum=1.0), "momentum"),
        ("dn", dict(buffer_size=2, server_lr=1.0, momentum=-0.1), "momentum"),
        ("fadas", dict(buffer_size=2, server_lr=1.0, beta2=1.0), "beta1` and `beta2"),
        ("fadas", dict(buffer_size=2, server_lr=1.0, tau_c=0), "tau_c"),
    ]:
        with pytest.raises(ValueError, match=f"`{field}`"):
            make_rule(name, **kwargs)


# ---------------------------------------------------------------------------------------------
# sync baseline helper
# ---------------------------------------------------------------------------------------------
def test_fedavg_mean_weights_and_errors():
    mean = fedavg_mean([{"w": t(3, 0)}, {"w": t(0, 6)}], [1.0, 2.0])
    assert_state(mean, w=t(1, 4))  # ([3, 0] + 2 [0, 6]) / 3
    with pytest.raises(ValueError, match="one weight per update"):
        fedavg_mean([{"w": t(1)}], [1.0, 2.0])
    with pytest.raises(ValueError, match="not all 0"):
        fedavg_mean([{"w": t(1)}], [0.0])
    with pytest.raises(ValueError, match="updates\\[1\\]\\['w'\\].*shape"):
        fedavg_mean([{"w": t(1)}, {"w": t(1, 2)}], [1.0, 1.0])


def test_rules_accept_updates_in_another_dtype():
    x = {"w": torch.zeros(2, dtype=torch.float32)}
    ASGD(server_lr=1.0).apply(x, {"w": t(1.5, 2.5)}, staleness=random.randint(0, 3), node=0)
    assert x["w"].dtype == torch.float32
    torch.testing.assert_close(x["w"], torch.tensor([1.5, 2.5]))


@pytest.mark.parametrize("name", RULES)
def test_rules_update_live_model_parameters_in_place(name):
    # The loop passes the server model's own nn.Parameters (requires_grad=True) as x.
    model = torch.nn.Linear(3, 2).double()
    x = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in x.items()}
    rule = make_rule(name, **{**RULE_KWARGS[name], **({"buffer_size": 1} if name in ("fedbuff", "fadas") else {})})
    update = {k: torch.ones_like(v) for k, v in before.items()}
    assert rule.apply(x, update, staleness=0, node=0).stepped
    assert all(x[k] is p for k, p in model.named_parameters())
    assert all(not torch.equal(x[k], before[k]) for k in x)


# ---------------------------------------------------------------------------------------------
# server momentum, FedAvg(M), Delayed Nesterov, FADAS
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("nesterov", "expected"), [(True, 4.75), (False, 3.5)])
def test_server_momentum_hand_computed(nesterov, expected):
    # beta 0.5, lr 1, g = 1 then 2. Nesterov: m=1, x += 1 + 0.5*1; m = 2.5, x += 2 + 0.5*2.5
    # -> 1.5 + 3.25. Heavy ball: x += m: 1 + 2.5.
    x, opt = state(w=t(0)), ServerMomentum(0.5, nesterov=nesterov)
    opt.step(x, [t(1)], lr=1.0)
    opt.step(x, [t(2)], lr=1.0)
    assert_state(x, w=t(expected))


def test_fedavg_round_is_the_weighted_mean_and_momentum_carries_over_rounds():
    x, rule = state(w=t(0, 0)), FedAvg(server_lr=2.0, momentum=0.5)
    coefs = rule.apply_round(x, [{"w": t(3, 0)}, {"w": t(0, 6)}], [1.0, 2.0])
    assert coefs == [pytest.approx(2 / 3), pytest.approx(4 / 3)]
    # mean [1, 4]; m = [1, 4]; x += 2 ([1, 4] + 0.5 [1, 4]) = [3, 12]
    assert_state(x, w=t(3, 12))
    rule.apply_round(x, [{"w": t(2, 2)}], [5.0])  # m = [2.5, 4]; x += 2 ([2, 2] + [1.25, 2])
    assert_state(x, w=t(9.5, 20))
    plain = FedAvg(server_lr=1.0)
    y = state(w=t(0, 0))
    plain.apply_round(y, [{"w": t(3, 0)}, {"w": t(0, 6)}], [1.0, 2.0])
    assert_state(y, w=t(1, 4))
    with pytest.raises(ValueError, match="updates\\[1\\]\\['w'\\].*shape"):
        plain.apply_round(y, [{"w": t(1, 1)}, {"w": t(1, 2, 3)}], [1.0, 1.0])
    assert_state(y, w=t(1, 4))


def test_fedbuff_with_momentum_steps_once_per_buffer_on_its_mean():
    ups = [t(1, 0), t(3, 2), t(0, 4), t(2, 2)]
    x, rule = state(w=t(0, 0)), FedBuff(buffer_size=2, server_lr=0.5, momentum=0.9)
    x_ref, opt = state(w=t(0, 0)), ServerMomentum(0.9)
    for i, u in enumerate(ups):
        applied = rule.apply(x, {"w": u}, staleness=0, node=i)
        assert applied.stepped == (i % 2 == 1)
    opt.step(x_ref, [(ups[0] + ups[1]) / 2], lr=0.5)
    opt.step(x_ref, [(ups[2] + ups[3]) / 2], lr=0.5)
    assert_state(x, w=x_ref["w"])


def test_delayed_nesterov_hand_computed():
    # N = 2, lr = 1, beta = 0.5. Arrivals 1, 3: x = 0.5, 2.0; milestone m = (1 + 3) / 2 = 2,
    # x += 0.5 * 2 -> 3.0. Arrivals 2, 0: x = 4.0, 4.0; m = 0.5 * 2 + 1 = 2, x += 1 -> 5.0.
    x, rule = state(w=t(0)), DelayedNesterov(buffer_size=2, server_lr=1.0, momentum=0.5)
    seen = []
    for d in (1, 3, 2, 0):
        applied = rule.apply(x, {"w": t(d)}, staleness=0, node=0)
        assert applied == Applied(0.5, True)
        seen.append(float(x["w"]))
    assert seen == [0.5, 3.0, 4.0, 5.0]
    # over each N arrivals: one Nesterov step on their mean
    y, opt = state(w=t(0)), ServerMomentum(0.5)
    opt.step(y, [t(2)], lr=1.0)
    opt.step(y, [t(1)], lr=1.0)
    assert_state(x, w=y["w"])


def test_delayed_nesterov_without_momentum_is_asgd_with_lr_over_n():
    ups = random_updates(11, 9)
    x, y = fresh_x(), fresh_x()
    s = make_staleness_fn("polynomial", 0.5, 0)
    dn, fb = DelayedNesterov(3, 0.6, momentum=0.0, staleness_fn=s), FedBuff(1, 0.2, staleness_fn=s)
    for node, tau, u in ups:
        dn.apply(x, u, staleness=tau, node=node)
        fb.apply(y, u, staleness=tau, node=node)
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-12, atol=1e-12)


def test_fadas_amsgrad_step_hand_computed():
    # K = 1, lr 0.1, b1 0.9, b2 0.99, eps 0. d = 2: m = 0.2, v = v_hat = 0.04 -> x += 0.1.
    # d = -1: m = 0.08, v = 0.0496 -> x += 0.1 * 0.08 / sqrt(0.0496).
    x, rule = state(w=t(0)), FADAS(buffer_size=1, server_lr=0.1, beta1=0.9, beta2=0.99, eps=1e-300, tau_c=10)
    rule.apply(x, {"w": t(2)}, staleness=0, node=0)
    assert float(x["w"]) == pytest.approx(0.1, rel=1e-12)
    rule.apply(x, {"w": t(-1)}, staleness=0, node=0)
    assert float(x["w"]) == pytest.approx(0.1 + 0.1 * 0.08 / math.sqrt(0.0496), rel=1e-12)
    # v_hat keeps the max: a small later delta does not inflate the step
    assert_state(rule.state_dict()["v_hat"], w=t(0.0496))


def test_fadas_buffers_k_and_adapts_the_step_to_the_largest_staleness():
    rule = FADAS(buffer_size=2, server_lr=0.5, tau_c=2)
    assert rule.step_size(2) == 0.5 and rule.step_size(4) == 0.25 and rule.step_size(1) == 0.5
    x = state(w=t(0, 0))
    assert not rule.apply(x, {"w": t(1, -1)}, staleness=4, node=0).stepped
    assert_state(x, w=t(0, 0))
    applied = rule.apply(x, {"w": t(3, -3)}, staleness=0, node=1)
    # mean [2, -2]; first AMSGrad step moves each coordinate by lr_t * sign = 0.25 (tau_max 4)
    assert applied.stepped and applied.weight == pytest.approx(0.25 / 2)
    torch.testing.assert_close(x["w"], t(0.25, -0.25), rtol=1e-6, atol=0)
    assert rule.apply(x, {"w": t(1, 1)}, staleness=0, node=0) == Applied(0.0, False)
    assert rule.flush(x).stepped and rule.count == 0


# ---------------------------------------------------------------------------------------------
# saga-est (Algorithm 4), page (Algorithm 6)
# ---------------------------------------------------------------------------------------------
def test_saga_estimator_hand_computed():
    # lr 1. Node 0 sends 2 (newcomer: x += 2); node 1 sends 4 (x += 4); node 0 sends 1:
    # x += 1 - 2 + mean(2, 4) = 2.
    x, rule = state(w=t(0)), SagaEstimator(server_lr=1.0)
    for node, d, expect in [(0, 2, 2), (1, 4, 6), (0, 1, 8)]:
        assert rule.apply(x, {"w": t(d)}, staleness=0, node=node) == Applied(1.0, True)
        assert_state(x, w=t(expect))
    assert_state(rule.state_dict()["table"][0], w=t(1))
    rule.forget(1)  # the mean is over the remaining nodes: next step 5 - 1 + 1
    rule.apply(x, {"w": t(5)}, staleness=0, node=0)
    assert_state(x, w=t(13))


def test_saga_estimator_matches_shifted_alpha1_once_every_node_reported():
    # With every table entry filled, Algorithm 4 and `shifted` (identity compressor, alpha 1)
    # take the same steps: compare after each node has reported once through both.
    n, ups = 3, random_updates(3, 20)
    warm = [(i, 0, {k: torch.full_like(v, float(i + 1)) for k, v in fresh_x().items()}) for i in range(n)]
    x, y = fresh_x(), fresh_x()
    est, shifted = SagaEstimator(0.25), Shifted(0.25, 1.0, num_clients=n)
    clients = {i: ClientShift(1.0) for i in range(n)}
    for node, tau, delta in warm + ups:
        est.apply(x, delta, staleness=tau, node=node)
        decoded = clients[node].residual(delta)
        clients[node].update(decoded)
        shifted.apply(y, decoded, staleness=tau, node=node)
        if node == n - 1 and len(est._table) == n:
            x_at, y_at = copy.deepcopy(x), copy.deepcopy(y)  # both have every entry now
            break
    for node, tau, delta in ups:
        est.apply(x_at, delta, staleness=tau, node=node)
        decoded = clients[node].residual(delta)
        clients[node].update(decoded)
        shifted.apply(y_at, decoded, staleness=tau, node=node)
    for k in x_at:  # the two differ only by the constant offset of the warm-up steps
        torch.testing.assert_close(x_at[k] - x[k], y_at[k] - y[k], rtol=1e-10, atol=1e-10)


def test_page_fresh_replaces_and_diff_adds_to_the_table_entry():
    # lr 1: node 0 fresh 2 -> x += 2; node 1 fresh 4 -> x += (2 + 4) / 2; node 0 diff 1 ->
    # g0 = 3 -> x += (3 + 4) / 2; node 0 fresh 0 -> g0 = 0 -> x += 2.
    x, rule = state(w=t(0)), Page(server_lr=1.0)
    for node, kind, d, expect in [(0, "fresh", 2, 2), (1, "fresh", 4, 5), (0, "diff", 1, 8.5), (0, "fresh", 0, 10.5)]:
        rule.apply(x, {"w": t(d)}, staleness=0, node=node, info={"page-diff": int(kind == "diff")})
        assert_state(x, w=t(expect))
    # a difference for a node with no entry is not applied
    assert rule.apply(x, {"w": t(9)}, staleness=0, node=5, info={"page-diff": 1}) == Applied(0.0, False)
    assert_state(x, w=t(10.5))
    with pytest.raises(ValueError, match="page-diff"):
        rule.apply(x, {"w": t(1)}, staleness=0, node=0, info={"page-diff": 2})
    assert_state(x, w=t(10.5))
