"""`stale-align`: the stale update's component along the progress since its base, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncfl.strategies.stale_align import align, progress_cosine


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": scale * torch.randn(5, 4, generator=g), "b": scale * torch.randn(4, generator=g)}


def _flat(t: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([t[k].double().numpy().ravel() for k in sorted(t)])


@pytest.fixture
def case():
    base, x, u = _state(0), _state(1), _state(2, scale=0.3)
    x = {k: base[k] + v for k, v in x.items()}  # progress p = x - base is _state(1)
    return u, x, base


def test_cosine_is_the_cosine_of_the_flattened_vectors(case):
    u, x, base = case
    uf, pf = _flat(u), _flat(x) - _flat(base)
    want = uf @ pf / (np.linalg.norm(uf) * np.linalg.norm(pf))
    assert progress_cosine(u, x, base) == pytest.approx(want, rel=1e-6)  # p is formed in fp32


def test_project_leaves_each_tensor_orthogonal_to_its_progress(case):
    u, x, base = case
    before = {k: v.clone() for k, v in u.items()}
    out = align("project", u, x, base)
    for k in u:
        uk, pk = u[k].double().numpy().ravel(), (x[k] - base[k]).double().numpy().ravel()
        want = uk - (uk @ pk) / (pk @ pk) * pk  # numpy, independent of the torch code
        np.testing.assert_allclose(out.update[k].double().numpy().ravel(), want, rtol=1e-5, atol=1e-6)
        assert abs(float(out.update[k].double().flatten() @ (x[k] - base[k]).double().flatten())) < 1e-4
        assert torch.equal(u[k], before[k])  # the input is not mutated
    assert out.scale == 1.0 and out.cos == pytest.approx(progress_cosine(u, x, base))


def test_scale_is_the_least_squares_factor_onto_the_orthogonal_part(case):
    u, x, base = case
    out = align("scale", u, x, base)
    uf, pf = _flat(u), _flat(x) - _flat(base)
    u_perp = uf - (uf @ pf) / (pf @ pf) * pf
    s_ls = np.linalg.lstsq(uf[:, None], u_perp, rcond=None)[0][0]  # argmin_s ||s u - u_perp||
    assert out.scale == pytest.approx(s_ls, rel=1e-6)
    assert 0 < out.scale < 1
    for k in u:
        torch.testing.assert_close(out.update[k], u[k] * out.scale)


def test_an_update_along_the_progress_is_removed_and_an_orthogonal_one_kept():
    base = {"w": torch.zeros(3)}
    x = {"w": torch.tensor([2.0, 0.0, 0.0])}
    along = align("project", {"w": torch.tensor([1.0, 0.0, 0.0])}, x, base)
    torch.testing.assert_close(along.update["w"], torch.zeros(3))
    assert align("scale", {"w": torch.tensor([-3.0, 0.0, 0.0])}, x, base).scale == pytest.approx(0.0)
    ortho = {"w": torch.tensor([0.0, 1.0, -1.0])}
    for mode in ("project", "scale"):
        out = align(mode, ortho, x, base)
        torch.testing.assert_close(out.update["w"], ortho["w"])
        assert out.cos == 0.0


@pytest.mark.parametrize("mode", ["off", "scale", "project"])
def test_no_progress_or_no_base_changes_nothing(case, mode):
    u, _, base = case
    for out in (align(mode, u, base, base), align(mode, u, base, None)):  # x == base; base unknown
        for k in u:
            torch.testing.assert_close(out.update[k], u[k])
        assert out.scale == 1.0 and out.cos == 0.0


def test_bad_mode_or_keys_are_clear_errors(case):
    u, x, base = case
    with pytest.raises(ValueError, match="stale-align must be one of 'off', 'scale', 'project', got 'both'"):
        align("both", u, x, base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\['extra'\]"):
        align("scale", {**u, "extra": torch.ones(2)}, x, base)
