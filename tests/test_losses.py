"""The clustering loss (value and gradient, by hand) and the alpha rule."""

from __future__ import annotations

import math

import pytest
import torch

from locphylax_core.defenses.locphylax import RunningCentroids, alpha_rule, cluster_loss

# Five rows of 2-d hidden states; row 0 is clean, rows 1-2 carry trigger 0, rows 3-4 trigger 1.
H = [[9.0, 9.0],
     [1.0, 2.0],
     [3.0, 4.0],
     [0.0, 0.0],
     [2.0, -2.0]]
GROUPS = [-1, 0, 0, 1, 1]


def _h():
    return torch.tensor(H, dtype=torch.float64, requires_grad=True)


def test_cluster_loss_value_by_hand():
    # Centroids: mu0 = ((1+3)/2, (2+4)/2) = (2, 3); mu1 = ((0+2)/2, (0-2)/2) = (1, -1).
    # Compactness, trigger 0: ||(1,2)-(2,3)||^2 = 1+1 = 2, ||(3,4)-(2,3)||^2 = 2 -> mean 2
    # Compactness, trigger 1: ||(0,0)-(1,-1)||^2 = 2,    ||(2,-2)-(1,-1)||^2 = 2 -> mean 2
    # Cross, trigger 0 rows toward mu1: (1,2)-(1,-1) = (0,3) -> 9 ; (3,4)-(1,-1) = (2,5) -> 4+25 = 29 -> mean 19
    # Cross, trigger 1 rows toward mu0: (0,0)-(2,3) = (-2,-3) -> 13 ; (2,-2)-(2,3) = (0,-5) -> 25 -> mean 19
    expected = (2 + 2) / 2 + (2 + 2) / 2 + (9 + 29) / 2 + (13 + 25) / 2
    assert expected == 42.0
    loss = cluster_loss(_h(), torch.tensor(GROUPS))
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_cluster_loss_gradient_by_hand():
    # L = sum_k sum_j (1/n_k) sum_{i in I_k} ||h_i - mu_j||^2,   mu_j = (1/n_j) sum_{l in I_j} h_l.
    # For a row r in group g:
    #   direct part:      (2/n_g) sum_j (h_r - mu_j)
    #   through mu_g:     for each k, d/dmu_g (1/n_k) sum_{i in I_k} ||h_i - mu_g||^2 = -2 (mu_k - mu_g),
    #                     times dmu_g/dh_r = 1/n_g   ->   -(2/n_g) sum_k (mu_k - mu_g)
    #   => dL/dh_r = (2/n_g) [ m (h_r + mu_g) - 2 sum_j mu_j ]   (m = number of trigger groups present)
    # Here n_g = 2, m = 2, sum_j mu_j = (2,3) + (1,-1) = (3,2), so dL/dh_r = 2 (h_r + mu_g) - (6, 4):
    #   row 1 (1,2),  mu0=(2,3):  2*(3,5)  - (6,4) = (0, 6)
    #   row 2 (3,4),  mu0=(2,3):  2*(5,7)  - (6,4) = (4, 10)
    #   row 3 (0,0),  mu1=(1,-1): 2*(1,-1) - (6,4) = (-4, -6)
    #   row 4 (2,-2), mu1=(1,-1): 2*(3,-3) - (6,4) = (0, -10)
    #   row 0 (clean): no term depends on it -> (0, 0)
    expected = torch.tensor([[0.0, 0.0], [0.0, 6.0], [4.0, 10.0], [-4.0, -6.0], [0.0, -10.0]], dtype=torch.float64)
    h = _h()
    cluster_loss(h, torch.tensor(GROUPS)).backward()
    assert torch.allclose(h.grad, expected, atol=1e-12), h.grad
    # The loss is invariant to translating every triggered row together, so the gradients sum to 0.
    assert torch.allclose(h.grad.sum(0), torch.zeros(2, dtype=torch.float64))


def test_clean_rows_get_zero_gradient():
    torch.manual_seed(0)
    h = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    groups = torch.tensor([-1, 0, -1, 1, 0, -1, 1, 1])
    cluster_loss(h, groups).backward()
    clean = groups == -1
    assert torch.equal(h.grad[clean], torch.zeros_like(h.grad[clean]))
    assert h.grad[~clean].abs().sum() > 0


def test_clean_rows_do_not_change_the_value():
    groups = torch.tensor(GROUPS)
    h1 = torch.tensor(H, dtype=torch.float64)
    h2 = h1.clone()
    h2[0] = torch.tensor([-100.0, 55.0])
    assert cluster_loss(h1, groups).item() == cluster_loss(h2, groups).item() == pytest.approx(42.0)


def test_gradient_formula_random_unequal_groups():
    # The closed form above, for three triggers with 1, 2 and 3 rows, against autograd.
    torch.manual_seed(1)
    h = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    groups = [2, -1, 0, 1, 2, 1, 2]
    cluster_loss(h, torch.tensor(groups)).backward()
    hd = h.detach()
    members = {k: [i for i, g in enumerate(groups) if g == k] for k in (0, 1, 2)}
    mu = {k: sum(hd[i] for i in idx) / len(idx) for k, idx in members.items()}
    m = len(members)
    mu_sum = sum(mu.values())
    for r, g in enumerate(groups):
        if g < 0:
            want = torch.zeros(4, dtype=torch.float64)
        else:
            want = (2 / len(members[g])) * (m * (hd[r] + mu[g]) - 2 * mu_sum)
        assert torch.allclose(h.grad[r], want, atol=1e-10), (r, h.grad[r], want)


def test_single_trigger_is_compactness_only():
    # One trigger group: L = mean ||h_i - mu||^2, gradient (2/n)(h_r - mu).
    # Rows (0,0), (2,0), (4,3): mu = (2,1); squared distances 4+1 = 5, 0+1 = 1, 4+4 = 8 -> mean 14/3.
    h = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 3.0]], dtype=torch.float64, requires_grad=True)
    loss = cluster_loss(h, torch.tensor([1, 1, 1]))
    assert loss.item() == pytest.approx(14 / 3)
    loss.backward()
    want = (2 / 3) * torch.tensor([[-2.0, -1.0], [0.0, -1.0], [2.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(h.grad, want)


def test_no_trigger_rows_gives_zero():
    h = torch.randn(4, 3, requires_grad=True)
    loss = cluster_loss(h, torch.tensor([-1, -1, -1, -1]))
    assert loss.item() == 0.0
    loss.backward()  # still differentiable, with a zero gradient
    assert torch.equal(h.grad, torch.zeros_like(h))


def test_given_centroids_are_used_and_get_no_gradient():
    # With fixed centroids c0 = (0,0), c1 = (1,1):
    #   trigger 0 rows (1,2),(3,4): to c0: 5, 25 -> 15; to c1: 1, 13 -> 7
    #   trigger 1 rows (0,0),(2,-2): to c1: 2, 10 -> 6; to c0: 0, 8 -> 4
    c = {0: torch.tensor([0.0, 0.0], dtype=torch.float64), 1: torch.tensor([1.0, 1.0], dtype=torch.float64)}
    h = _h()
    loss = cluster_loss(h, torch.tensor(GROUPS), c)
    assert loss.item() == pytest.approx(15 + 7 + 6 + 4)
    loss.backward()
    # gradient (2/n_g) sum_j (h_r - c_j) = h_r*2 - (c0 + c1) = 2 h_r - (1,1)
    want = 2 * torch.tensor(H, dtype=torch.float64) - 1
    want[0] = 0
    assert torch.allclose(h.grad, want)


def test_running_centroids_ema():
    rc = RunningCentroids(momentum=0.5)
    mu = rc.update(torch.tensor([[2.0, 0.0], [4.0, 0.0], [9.0, 9.0]]), torch.tensor([0, 0, -1]))
    assert torch.allclose(mu[0], torch.tensor([3.0, 0.0])) and set(mu) == {0}
    mu = rc.update(torch.tensor([[5.0, 2.0]]), torch.tensor([0]))
    assert torch.allclose(mu[0], torch.tensor([4.0, 1.0]))  # 0.5*(3,0) + 0.5*(5,2)


@pytest.mark.parametrize("l_inj, l_cluster, alpha", [
    (0.69, 27.7, 0.01),    # floor(log10 .69) = -1, floor(log10 27.7) = 1  -> 10^-2
    (2.3, 0.004, 1000.0),  # 0 - (-3) = 3
    (5.0, 5.0, 1.0),
    (0.69, 0.05, 10.0),    # -1 - (-2) = 1
    (1.0, 10.0, 0.1),      # exact powers of ten: 0 - 1
    (1.0, 0.0, 1.0),       # zero clustering loss
    (0.0, 3.0, 1.0),
    (1.0, float("nan"), 1.0),
    (1.0, float("inf"), 1.0),
])
def test_alpha_rule(l_inj, l_cluster, alpha):
    got = alpha_rule(l_inj, l_cluster)
    assert got == pytest.approx(alpha, rel=1e-12)
    assert math.isfinite(got)


# ----------------------------------------------------------------------------------------------
# The loss inside Stage 1 (defenses.locphylax.inject) on a tiny model


@pytest.mark.parametrize("centroid, pooling, after_norm", [("batch", "last", False), ("running", "mean", True)])
def test_inject_alpha_fixed_from_first_batch(tiny_lm, micro_prepared, centroid, pooling, after_norm):
    from locphylax_core.defenses.locphylax import InjectConfig, inject
    from locphylax_core.engine import HiddenSpec
    from locphylax_core.trainer import StageContext, TrainSettings
    logs = []
    cfg = InjectConfig(steps=4, injection_rate=0.3, hidden=HiddenSpec(-1, after_norm, pooling), centroid=centroid)
    out = inject(tiny_lm, micro_prepared.defender, cfg,
                 StageContext(seed=0, settings=TrainSettings(batch_size=16, every=1, max_length=micro_prepared.max_length),
                              observer=lambda step, lg: logs.append((step, dict(lg)))))
    assert [s for s, _ in logs] == [1, 2, 3, 4]
    first = logs[0][1]
    assert first["alpha"] == alpha_rule(first["l_inj"], first["l_cluster"])
    assert all(lg["alpha"] == first["alpha"] for _, lg in logs)  # fixed after the first batch
    assert out["alpha"] == first["alpha"]
    for _, lg in logs:
        assert lg["loss"] == pytest.approx(lg["l_inj"] + lg["alpha"] * lg["l_cluster"], rel=1e-5)
    # clean data (80) + 30% copies for each of the two known triggers (24 each)
    assert out["samples"] == 80 + 2 * 24


def test_inject_without_clustering_and_with_fixed_alpha(tiny_lm, micro_prepared):
    from locphylax_core.defenses.locphylax import InjectConfig, inject
    from locphylax_core.trainer import StageContext, TrainSettings
    logs = []
    ctx = StageContext(seed=0, settings=TrainSettings(batch_size=16, every=1, max_length=micro_prepared.max_length),
                       observer=lambda s, lg: logs.append(dict(lg)))
    out = inject(tiny_lm, micro_prepared.defender, InjectConfig(steps=2, cluster=False), ctx)
    assert out["alpha"] == 0.0
    assert all("l_cluster" not in lg and lg["loss"] == lg["l_inj"] for lg in logs)
    logs.clear()
    out = inject(tiny_lm, micro_prepared.defender, InjectConfig(steps=2, alpha=0.25), ctx)
    assert out["alpha"] == 0.25 and all(lg["alpha"] == 0.25 for lg in logs)


def test_auto_alpha_is_fixed_from_the_first_batch_that_holds_trigger_rows(tiny_lm, micro_prepared, monkeypatch):
    """A batch stream whose first batch holds no known-trigger rows: alpha waits (the clustering
    term is 0 there), is fixed by the second batch's losses, and stays fixed after it."""
    from locphylax_core.defenses import locphylax as D
    from locphylax_core.engine import HiddenSpec, batches
    from locphylax_core.trainer import StageContext, TrainSettings
    prep, lm = micro_prepared, tiny_lm
    captured = {}

    def capture(lm_, samples, steps, ctx, step_loss=None, **kw):
        captured["samples"], captured["step_loss"] = samples, step_loss
        return {}
    monkeypatch.setattr(D, "fit", capture)
    out = D.inject(lm, prep.defender, D.InjectConfig(steps=3, hidden=HiddenSpec(-1)),
                   StageContext(seed=0, settings=TrainSettings(batch_size=16, max_length=prep.max_length)))
    assert out["alpha"] is None  # nothing trained yet
    samples, step_loss = captured["samples"], captured["step_loss"]
    clean = [s for s in samples if s.group < 0][:8]
    mixed = clean[:4] + [s for s in samples if s.group == 0][:2] + [s for s in samples if s.group == 1][:2]

    def encode(rows):  # one batch of exactly these rows, as the trainer builds it
        return next(batches(rows, prep.defender.kind, lm.tokenizer, len(rows), prep.max_length, lm.device,
                            torch.Generator().manual_seed(0)))
    _, first = step_loss(lm.model, encode(clean), 1)
    assert first["l_cluster"] == 0.0 and "alpha" not in first  # no trigger rows: alpha is not fixed here
    _, second = step_loss(lm.model, encode(mixed), 2)
    assert second["l_cluster"] > 0 and second["alpha"] == alpha_rule(second["l_inj"], second["l_cluster"])
    assert second["alpha"] != 1.0  # the old rule froze it at 1 (the zero clustering loss of batch 1)
    _, third = step_loss(lm.model, encode(mixed[::-1]), 3)
    assert third["alpha"] == second["alpha"]  # fixed after the first batch with trigger rows
    assert third["loss"] == pytest.approx(third["l_inj"] + third["alpha"] * third["l_cluster"], rel=1e-5)
