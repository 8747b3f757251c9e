"""GSPO, CISPO, the advantage estimators (RLOO, REINFORCE++), on-policy distillation and GKD against
numpy references written from the papers' formulas (not from the torch code), and the properties that
define them: limits, symmetries, invariances. Equality with TRL's own code is tests/test_trl_equality.py."""
import numpy as np
import pytest
import torch

import losses.distill as distill
from losses.advantages import (ADVANTAGES, get_advantage, group_advantages, kl_in_reward, register_advantage,
                               reinforce_pp_advantages, reinforce_pp_baseline_advantages, rloo_advantages)
from losses.cispo import cispo_loss
from losses.distill import generalized_jsd, gkd_loss, opd_advantages, opd_loss
from losses.grpo import grpo_loss
from losses.gspo import gspo_loss

T64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=T64)


def lengths_mask(rng, N, T):
    lengths = rng.integers(1, T + 1, N)
    return (np.arange(T)[None] < lengths[:, None]).astype(np.float64)


def grad_of(fn, x):
    """(value, d value / d x) of a scalar torch function of a numpy array."""
    xt = t(x).requires_grad_(True)
    out = fn(xt)
    out = out[0] if isinstance(out, tuple) else out
    out.backward()
    return out.item(), xt.grad.numpy()


# ================================================================ advantage estimators

def np_rloo(r, G):
    r = np.asarray(r, dtype=np.float64)
    out = np.zeros_like(r)
    for g in range(0, len(r), G):
        for i in range(g, g + G):
            others = [r[j] for j in range(g, g + G) if j != i]
            out[i] = r[i] - np.mean(others) if others else 0.0
    return out


def np_standardise(x, eps):
    return (x - x.mean()) / ((x.std(ddof=1) if len(x) > 1 else 0.0) + eps)


def np_rpp_baseline(r, G, eps):
    g = np.asarray(r, dtype=np.float64).reshape(-1, G)
    return np_standardise((g - g.mean(axis=1, keepdims=True)).reshape(-1), eps)


def test_registry_holds_every_estimator_and_rejects_unknown_or_duplicate_names():
    assert {"grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"} <= set(ADVANTAGES)
    assert get_advantage("grpo") is group_advantages
    import losses.grpo
    assert losses.grpo.group_advantages is group_advantages          # the old import path still works
    with pytest.raises(ValueError, match=r"must be one of .*'rloo'.*got 'gae'"):
        get_advantage("gae")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("rloo")(lambda rewards, group_size: rewards)
    assert register_advantage("rloo")(rloo_advantages) is rloo_advantages   # re-registering the same is fine


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_estimator_keeps_group_advantages_results(scale):
    rng = np.random.default_rng(1)
    r = rng.normal(size=24)
    g = r.reshape(-1, 4)
    adv = (g - g.mean(1, keepdims=True)).reshape(-1)
    std = {"group": np.repeat(g.std(axis=1, ddof=1), 4), "batch": r.std(ddof=1), "none": None}[scale]
    expected = adv if std is None else adv / (std + 1e-4)
    np.testing.assert_allclose(get_advantage("grpo")(t(r), 4, scale).numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_matches_numpy(G, normalize):
    rng = np.random.default_rng(2)
    r = rng.normal(size=4 * G)
    expected = np_rloo(r, G)
    if normalize:
        expected = np_standardise(expected, 1e-4)
    np.testing.assert_allclose(get_advantage("rloo")(t(r), G, normalize=normalize).numpy(), expected, rtol=1e-12,
                               atol=1e-12)


def test_rloo_properties():
    rng = np.random.default_rng(3)
    r = t(rng.normal(size=20))
    adv = rloo_advantages(r, 5)
    torch.testing.assert_close(adv.view(-1, 5).sum(1), torch.zeros(4, dtype=T64), atol=1e-12, rtol=0)  # zero per group
    torch.testing.assert_close(adv, 5 / 4 * group_advantages(r, 5, "none"))     # G/(G−1) × the group-centred reward
    assert torch.equal(rloo_advantages(t([0.3, 0.9, 0.1]), 1), torch.zeros(3, dtype=T64))   # no sibling: no signal
    assert torch.equal(rloo_advantages(t([1.0, 1.0, 0.0, 0.0]), 2), torch.zeros(4, dtype=T64))   # tied groups
    assert rloo_advantages([1, 0, 0, 0], 4).dtype == torch.float32


@pytest.mark.parametrize("G", [1, 4])
def test_reinforce_pp_matches_numpy_and_is_standardised_over_the_batch(G):
    rng = np.random.default_rng(4)
    r = rng.normal(1.0, 3.0, size=16)
    got = reinforce_pp_advantages(t(r), G)
    np.testing.assert_allclose(got.numpy(), np_standardise(r, 1e-4), rtol=1e-12, atol=1e-12)
    exact = get_advantage("reinforce_plus_plus")(t(r), G, eps=0.0)
    assert abs(exact.mean().item()) < 1e-12 and abs(exact.std().item() - 1) < 1e-12   # zero mean, unit std
    for a, b in [(3.0, -7.0), (0.25, 2.0)]:                                          # affine-invariant (a > 0)
        torch.testing.assert_close(reinforce_pp_advantages(a * t(r) + b, G, eps=0.0), exact)


def test_reinforce_pp_baseline_matches_numpy_and_its_properties():
    rng = np.random.default_rng(5)
    r = rng.normal(size=24)
    got = get_advantage("reinforce_plus_plus_baseline")(t(r), 4)
    np.testing.assert_allclose(got.numpy(), np_rpp_baseline(r, 4, 1e-4), rtol=1e-12, atol=1e-12)
    exact = reinforce_pp_baseline_advantages(t(r), 4, eps=0.0)
    assert abs(exact.mean().item()) < 1e-12 and abs(exact.std().item() - 1) < 1e-12
    # a prompt-level offset (an easy prompt) cancels: adding a constant to one group changes nothing
    shifted = r.copy()
    shifted[4:8] += 10.0
    torch.testing.assert_close(reinforce_pp_baseline_advantages(t(shifted), 4, eps=0.0), exact)
    # unlike GRPO's "batch" scaling, which divides by the std of the RAW rewards
    assert not torch.allclose(exact, group_advantages(t(r), 4, "batch", eps=0.0))
    # G = 1: every completion is its own baseline, nothing to learn, and no NaN
    assert torch.equal(reinforce_pp_baseline_advantages(t([0.2, 0.7]), 1), torch.zeros(2, dtype=T64))


def test_kl_in_reward_matches_numpy_and_ignores_padding():
    rng = np.random.default_rng(6)
    N, T, beta = 6, 5, 0.05
    r = rng.normal(size=N)
    old, ref = rng.normal(-2, 0.5, (N, T)), rng.normal(-2, 0.5, (N, T))
    m = lengths_mask(rng, N, T)
    expected = r - beta * ((old - ref) * m).sum(1)
    np.testing.assert_allclose(kl_in_reward(t(r), t(old), t(ref), t(m), beta).numpy(), expected, rtol=1e-12)
    junk_old = np.where(m > 0, old, np.inf)           # padding may hold anything
    np.testing.assert_allclose(kl_in_reward(t(r), t(junk_old), t(ref), t(m), beta).numpy(), expected, rtol=1e-12)
    assert torch.equal(kl_in_reward(t(r), t(old), t(ref), t(m), 0.0), t(r))
    with pytest.raises(ValueError, match="rewards must be"):
        kl_in_reward(t(r[:3]), t(old), t(ref), t(m), beta)
    with pytest.raises(ValueError, match="beta"):
        kl_in_reward(t(r), t(old), t(ref), t(m), -1.0)


def test_estimators_reject_bad_shapes():
    for name in ADVANTAGES:
        with pytest.raises(ValueError, match="groups of 4"):
            get_advantage(name)(t([1.0, 2.0, 3.0]), 4)
        with pytest.raises(ValueError, match="1-D"):
            get_advantage(name)(t([[1.0, 2.0]]), 1)


# ================================================================ GSPO

def np_gspo(lp, old, adv, m, el, eh):
    """Loss and its gradient in logp, from the paper: s_i = exp(mean_t log(π/π_old)), clip on s_i."""
    N = lp.shape[0]
    L = np.maximum(m.sum(1), 1)
    s = np.exp(((lp - old) * m).sum(1) / L)[:, None]
    A = adv[:, None] if adv.ndim == 1 else adv
    unclipped, clipped = s * A, np.clip(s, 1 - el, 1 + eh) * A
    term = -np.minimum(unclipped, clipped)
    loss = np.mean((term * m).sum(1) / L)
    # a term passes gradient when the min picks the unclipped branch: d s_it / d logp_it = s_i
    free = ((A > 0) & (s <= 1 + eh)) | ((A < 0) & (s >= 1 - el))
    grad = -(free * A * s * m) / L[:, None] / N
    return loss, grad, s[:, 0]


def gspo_batch(seed, N=12, T=9, scale=2e-3):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-1.5, 0.7, (N, T))
    old = lp + rng.normal(0, scale, (N, T))     # mean log-ratios spread across ε_low = 3e-4 / ε_high = 4e-4
    m = lengths_mask(rng, N, T)
    adv = np.abs(rng.normal(0, 1, N)) * np.resize([1.0, -1.0], N)
    return lp, old, adv, m


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.2, 0.2)])
def test_gspo_matches_numpy_value_gradient_and_metrics(eps):
    lp, old, adv, m = gspo_batch(0, scale=2e-3 if eps[0] < 0.1 else 0.8)
    ref_loss, ref_grad, s = np_gspo(lp, old, adv, m, *eps)
    loss, grad = grad_of(lambda x: gspo_loss(x, t(old), t(adv), t(m), *eps), lp)
    _, metrics = gspo_loss(t(lp), t(old), t(adv), t(m), *eps)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose([metrics["seq_ratio/min"], metrics["seq_ratio/mean"], metrics["seq_ratio/max"]],
                               [s.min(), s.mean(), s.max()], rtol=1e-12)
    S, A = s[:, None], adv[:, None]
    low = np.broadcast_to((S < 1 - eps[0]) & (A < 0), m.shape)
    high = np.broadcast_to((S > 1 + eps[1]) & (A > 0), m.shape)
    tok = m > 0
    np.testing.assert_allclose(metrics["clip_ratio/low"].item(), low[tok].mean(), rtol=1e-12)
    np.testing.assert_allclose(metrics["clip_ratio/high"].item(), high[tok].mean(), rtol=1e-12)
    np.testing.assert_allclose(metrics["clip_ratio/region"].item(), (low | high)[tok].mean(), rtol=1e-12)
    assert 0 < metrics["clip_ratio/low"] and 0 < metrics["clip_ratio/high"] and metrics["clip_ratio/region"] < 1


def test_gspo_token_matches_numpy_with_per_token_advantages():
    lp, old, _, m = gspo_batch(1)
    adv = np.random.default_rng(11).normal(0, 1, lp.shape)
    ref_loss, ref_grad, _ = np_gspo(lp, old, adv, m, 3e-4, 4e-4)
    loss, grad = grad_of(lambda x: gspo_loss(x, t(old), t(adv), t(m)), lp)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15)
    assert (ref_grad != 0).any() and (ref_grad[m > 0] == 0).any()   # some tokens free, some clipped


def test_gspo_token_with_constant_advantages_is_gspo():
    lp, old, adv, m = gspo_batch(2)
    seq = grad_of(lambda x: gspo_loss(x, t(old), t(adv), t(m)), lp)
    tok = grad_of(lambda x: gspo_loss(x, t(old), t(np.repeat(adv[:, None], lp.shape[1], 1)), t(m)), lp)
    np.testing.assert_allclose(tok[0], seq[0], rtol=1e-14)
    np.testing.assert_allclose(tok[1], seq[1], rtol=1e-14, atol=1e-16)


def test_gspo_at_ratio_one_is_the_reinforce_gradient_of_the_sequence_mean():
    lp, _, adv, m = gspo_batch(3)
    for old in (t(lp), None):
        loss, grad = grad_of(lambda x: gspo_loss(x, old, t(adv), t(m)), lp)
        # REINFORCE on the length-normalised sequence log-prob: −(1/N) Σ_i A_i · mean_t log π_it
        ref_loss, ref_grad = grad_of(lambda x: -(t(adv) * (x * t(m)).sum(1) / t(m).sum(1)).mean(), lp)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-16)
        np.testing.assert_allclose(loss, -adv.mean(), rtol=1e-12)    # value: −mean A (every s_i = 1)


def test_gspo_padding_and_empty_completions():
    lp, old, adv, m = gspo_batch(4, N=4, T=5)
    m[2] = 0                                                   # a completion with no tokens
    clean = grad_of(lambda x: gspo_loss(x, t(old), t(adv), t(m)), lp)
    junk = np.where(m > 0, lp, np.inf), np.where(m > 0, old, -np.inf)
    dirty = grad_of(lambda x: gspo_loss(x, t(junk[1]), t(adv), t(m)), junk[0])
    assert np.isfinite(dirty[0]) and np.isfinite(dirty[1]).all()
    np.testing.assert_allclose(dirty[0], clean[0], rtol=1e-14)
    np.testing.assert_allclose(dirty[1], clean[1], rtol=1e-14)
    np.testing.assert_allclose(clean[0], np_gspo(lp, old, adv, m, 3e-4, 4e-4)[0], rtol=1e-12)  # 0, counted in N
    assert (clean[1][2] == 0).all()
    _, metrics = gspo_loss(t(lp), t(old), t(adv), t(np.zeros_like(m)))
    assert metrics["seq_ratio/mean"].item() == 1.0 and metrics["clip_ratio/region"].item() == 0.0


def test_gspo_rejects_bad_input():
    lp, old, adv, m = gspo_batch(5, N=3, T=4)
    with pytest.raises(ValueError, match="advantages must be"):
        gspo_loss(t(lp), t(old), t(adv[:2]), t(m))
    with pytest.raises(ValueError, match="epsilon"):
        gspo_loss(t(lp), t(old), t(adv), t(m), epsilon_low=-0.1)
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        gspo_loss(t(lp), t(old), t(adv), t(m[:, :2]))


# ================================================================ CISPO

def np_cispo(lp, old, adv, m, el, eh, n_items=None):
    r = np.exp(lp - old)
    w = np.clip(r, -np.inf if el is None else 1 - el, 1 + eh)
    A = adv[:, None] if adv.ndim == 1 else adv
    n = n_items if n_items is not None else max(m.sum(), 1)
    loss = -(w * A * lp * m).sum() / n
    grad = -w * A * m / n                                     # the weight is a constant: d/dlogp (w·A·logp)
    return loss, grad, r, w


def cispo_batch(seed, N=8, T=7):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-1.5, 0.7, (N, T))
    old = lp + rng.normal(0, 1.2, (N, T))       # ratios from ~0.05 to ~20: past a cap of 5 and a floor of 0.8
    m = lengths_mask(rng, N, T)
    adv = np.abs(rng.normal(0, 1, N)) * np.resize([1.0, -1.0], N)
    return lp, old, adv, m


@pytest.mark.parametrize("eps", [(None, 4.0), (0.2, 0.28)])
@pytest.mark.parametrize("per_token", [False, True])
def test_cispo_matches_numpy_value_gradient_and_metrics(eps, per_token):
    lp, old, adv, m = cispo_batch(0)
    if per_token:
        adv = np.random.default_rng(1).normal(0, 1, lp.shape)
    ref_loss, ref_grad, r, w = np_cispo(lp, old, adv, m, *eps)
    loss, grad = grad_of(lambda x: cispo_loss(x, t(old), t(adv), t(m), *eps), lp)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-16)
    _, metrics = cispo_loss(t(lp), t(old), t(adv), t(m), *eps)
    tok, A = m > 0, np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, m.shape)
    low = r < (1 - eps[0]) if eps[0] is not None else np.zeros_like(tok)
    high = r > 1 + eps[1]
    for key, v in {"clip_ratio/low": low, "clip_ratio/high": high, "clip_ratio/region": low | high,
                   "cispo_clip_ratio": high & (A > 0), "ratio_mean": r, "weight_mean": w}.items():
        np.testing.assert_allclose(metrics[key].item(), v[tok].mean(), rtol=1e-12, err_msg=key)
    assert metrics["clip_ratio/high"] > 0 and (eps[0] is None or metrics["clip_ratio/low"] > 0)


def test_cispo_without_clipping_is_the_vanilla_importance_sampled_policy_gradient():
    lp, old, adv, m = cispo_batch(2)
    _, grad = grad_of(lambda x: cispo_loss(x, t(old), t(adv), t(m), None, 1e9), lp)
    # ∇ of −Σ r·A / n with r = π/π_old is −Σ r·A·∇log π / n
    _, vanilla = grad_of(lambda x: -(torch.exp(x - t(old)) * t(adv)[:, None] * t(m)).sum() / t(m).sum(), lp)
    np.testing.assert_allclose(grad, vanilla, rtol=1e-12, atol=1e-16)


def test_cispo_clipped_tokens_keep_a_capped_gradient_where_ppo_gives_none():
    # one token per sequence, old = 0: ratios 10 (A > 0, above the cap) and 0.1 (A < 0, below a floor of 0.8)
    lp = np.log([[10.0], [0.1]])
    adv, m, old = np.array([1.0, -1.0]), np.ones((2, 1)), np.zeros((2, 1))
    _, g_cispo = grad_of(lambda x: cispo_loss(x, t(old), t(adv), t(m), 0.2, 4.0), lp)
    _, g_ppo = grad_of(lambda x: grpo_loss(x, t(old), t(adv), t(m), epsilon_low=0.2, epsilon_high=4.0,
                                           loss_type="bnpo"), lp)
    np.testing.assert_allclose(g_cispo[:, 0], [-5.0 * 1 / 2, -0.8 * -1 / 2], rtol=1e-12)   # −w·A/n
    assert (g_ppo == 0).all()


def test_cispo_normaliser_splits_over_micro_batches_and_first_step():
    lp, old, adv, m = cispo_batch(3)
    full, _ = cispo_loss(t(lp), t(old), t(adv), t(m))
    n = torch.tensor(m.sum())
    parts = [cispo_loss(t(lp[i:i + 2]), t(old[i:i + 2]), t(adv[i:i + 2]), t(m[i:i + 2]), num_items_in_batch=n)[0]
             for i in range(0, 8, 2)]
    torch.testing.assert_close(sum(parts), full)
    loss, metrics = cispo_loss(t(lp), None, t(adv), t(m))
    assert metrics["ratio_mean"].item() == 1.0 and metrics["clip_ratio/region"].item() == 0.0
    np.testing.assert_allclose(loss.item(), -(adv[:, None] * lp * m).sum() / m.sum(), rtol=1e-12)
    with pytest.raises(ValueError, match="epsilon_low"):
        cispo_loss(t(lp), t(old), t(adv), t(m), epsilon_low=1.5)


# ================================================================ on-policy distillation (sampled-token reverse KL)

def test_opd_matches_numpy():
    rng = np.random.default_rng(7)
    N, T, coef = 5, 6, 0.7
    lp = rng.normal(-2, 0.6, (N, T))
    old = lp + rng.normal(0, 0.3, (N, T))
    teacher = rng.normal(-2, 0.6, (N, T))
    m = lengths_mask(rng, N, T)
    A = -coef * (old - teacher)
    r = np.exp(lp - old)
    loss, grad = grad_of(lambda x: opd_loss(x, t(old), t(teacher), t(m), coef=coef), lp)
    np.testing.assert_allclose(loss, -(r * A * m).sum() / m.sum(), rtol=1e-12)
    np.testing.assert_allclose(grad, -r * A * m / m.sum(), rtol=1e-12, atol=1e-16)
    _, metrics = opd_loss(t(lp), t(old), t(teacher), t(m), coef=coef)
    np.testing.assert_allclose(metrics["reverse_kl"].item(), (old - teacher)[m > 0].mean(), rtol=1e-12)
    np.testing.assert_allclose(opd_advantages(t(old), t(teacher), t(m), coef).numpy(), A * m, rtol=1e-12)
    # a token the teacher likes more than the student did gets a positive advantage, and is pushed up
    assert ((A > 0) == (teacher > old)).all()
    loss, metrics = opd_loss(t(lp), None, t(lp), t(m))               # student == teacher: nothing to learn
    assert loss.item() == 0.0 and metrics["reverse_kl"].item() == 0.0 and metrics["ratio_mean"].item() == 1.0


def test_opd_expected_gradient_is_the_exact_reverse_kl_gradient():
    """Over o ~ π at one position, E[∇ opd_loss(o)] = ∇ KL(π‖π_t): enumerate a small vocabulary exactly."""
    rng = np.random.default_rng(8)
    V = 7
    z = t(rng.normal(0, 1.5, V))
    log_t = torch.log_softmax(t(rng.normal(0, 1.5, V)), -1)
    expected = torch.zeros(V, dtype=T64)
    p = torch.softmax(z, -1)
    for o in range(V):
        zz = z.clone().requires_grad_(True)
        lp = torch.log_softmax(zz, -1)[o].view(1, 1)
        opd_loss(lp, None, log_t[o].view(1, 1), torch.ones(1, 1, dtype=T64))[0].backward()
        expected += p[o] * zz.grad
    zz = z.clone().requires_grad_(True)
    logp = torch.log_softmax(zz, -1)
    (logp.exp() * (logp - log_t)).sum().backward()
    torch.testing.assert_close(expected, zz.grad, rtol=1e-12, atol=1e-14)
    # and that is GKD at β = 1 (reverse KL) on the same position
    zz2 = z.clone().requires_grad_(True)
    generalized_jsd(zz2[None], log_t[None], beta=1.0).sum().backward()
    torch.testing.assert_close(zz2.grad, zz.grad, rtol=1e-12, atol=1e-14)


# ================================================================ GKD: JSD_β over full distributions

def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def np_jsd(zs, zt, beta, T=1.0):
    """Agarwal et al. Eq. 1 with P = teacher, Q = student; TRL's end points at β ∈ {0, 1}."""
    ps, pt = np_softmax(zs / T), np_softmax(zt / T)
    if beta == 0:
        return np_kl(pt, ps)
    if beta == 1:
        return np_kl(ps, pt)
    mix = beta * pt + (1 - beta) * ps
    return beta * np_kl(pt, mix) + (1 - beta) * np_kl(ps, mix)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("T", [1.0, 0.9])
def test_generalized_jsd_matches_numpy(beta, T):
    rng = np.random.default_rng(9)
    zs, zt = rng.normal(0, 2, (6, 11)), rng.normal(0, 2, (6, 11))
    np.testing.assert_allclose(generalized_jsd(t(zs), t(zt), beta, T).numpy(), np_jsd(zs, zt, beta, T), rtol=1e-11)
    # log-probs give the same rows as logits (log_softmax ignores a per-row shift, also after 1/T)
    ls = torch.log_softmax(t(zs), -1)
    np.testing.assert_allclose(generalized_jsd(ls, t(zt), beta, T).numpy(), np_jsd(zs, zt, beta, T), rtol=1e-11)


def test_jsd_end_points_are_the_limits_and_symmetries_hold():
    rng = np.random.default_rng(10)
    zs, zt = t(rng.normal(0, 2, (5, 9))), t(rng.normal(0, 2, (5, 9)))
    h = 1e-6
    forward, reverse = generalized_jsd(zs, zt, 0.0), generalized_jsd(zs, zt, 1.0)
    torch.testing.assert_close(forward, t(np_kl(np_softmax(zt.numpy()), np_softmax(zs.numpy()))))  # KL(t‖s)
    torch.testing.assert_close(reverse, t(np_kl(np_softmax(zs.numpy()), np_softmax(zt.numpy()))))  # KL(s‖t)
    torch.testing.assert_close(generalized_jsd(zs, zt, h) / h, forward, rtol=1e-4, atol=0)
    torch.testing.assert_close(generalized_jsd(zs, zt, 1 - h) / h, reverse, rtol=1e-4, atol=0)
    for beta in (0.2, 0.5, 0.7):                 # swapping the models swaps β and 1 − β
        torch.testing.assert_close(generalized_jsd(zs, zt, beta), generalized_jsd(zt, zs, 1 - beta))
    js = generalized_jsd(zs, zt, 0.5)
    assert (js > 0).all() and (js <= np.log(2)).all()              # the symmetric JSD is bounded by log 2
    for beta in (0.0, 0.3, 1.0):
        torch.testing.assert_close(generalized_jsd(zs, zs + 3.0, beta), torch.zeros(5, dtype=T64), atol=1e-12, rtol=0)


def gkd_case(seed, B=3, T=5, Hs=4, Ht=6, V=13):
    rng = np.random.default_rng(seed)
    hs, ws = rng.normal(0, 1, (B, T, Hs)), rng.normal(0, 0.7, (V, Hs))
    ht, wt = rng.normal(0, 1, (B, T, Ht)), rng.normal(0, 0.7, (V, Ht))
    m = lengths_mask(rng, B, T)
    return hs, ws, ht, wt, m


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_gkd_loss_matches_numpy_and_the_unchunked_gradient(beta, chunk):
    hs, ws, ht, wt, m = gkd_case(0)
    T_ = 0.9
    rows = m > 0
    per_pos = np_jsd(hs[rows] @ ws.T, ht[rows] @ wt.T, beta, T_)
    hs_t, ws_t = t(hs).requires_grad_(True), t(ws).requires_grad_(True)
    loss, metrics = gkd_loss(hs_t, ws_t, t(ht), t(wt), t(m), beta=beta, temperature=T_, chunk_tokens=chunk)
    np.testing.assert_allclose(loss.item(), per_pos.mean(), rtol=1e-11)
    np.testing.assert_allclose(metrics["jsd"].item(), per_pos.mean(), rtol=1e-11)
    np.testing.assert_allclose(metrics["reverse_kl"].item(), np_jsd(hs[rows] @ ws.T, ht[rows] @ wt.T, 1.0, T_).mean(),
                               rtol=1e-11)
    np.testing.assert_allclose(metrics["forward_kl"].item(), np_jsd(hs[rows] @ ws.T, ht[rows] @ wt.T, 0.0, T_).mean(),
                               rtol=1e-11)
    loss.backward()
    # the same loss over full (B, T, V) logits through plain autograd
    a, b = t(hs).requires_grad_(True), t(ws).requires_grad_(True)
    full = generalized_jsd((a @ b.t())[t(m).bool()], (t(ht) @ t(wt).t())[t(m).bool()], beta, T_).mean()
    full.backward()
    torch.testing.assert_close(hs_t.grad, a.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(ws_t.grad, b.grad, rtol=1e-10, atol=1e-13)


def test_gkd_loss_gradcheck_teacher_frozen_and_normaliser():
    hs, ws, ht, wt, m = gkd_case(1, B=2, T=3, V=5)
    assert torch.autograd.gradcheck(lambda a, b: gkd_loss(a, b, t(ht), t(wt), t(m), beta=0.3, chunk_tokens=2)[0],
                                    (t(hs).requires_grad_(True), t(ws).requires_grad_(True)))
    ht_t, wt_t = t(ht).requires_grad_(True), t(wt).requires_grad_(True)
    loss, _ = gkd_loss(t(hs).requires_grad_(True), t(ws), ht_t, wt_t, t(m))
    loss.backward()
    assert ht_t.grad is None and wt_t.grad is None                 # the teacher is never trained
    n = int(m.sum())
    base, _ = gkd_loss(t(hs), t(ws), t(ht), t(wt), t(m))
    scaled, _ = gkd_loss(t(hs), t(ws), t(ht), t(wt), t(m), num_items_in_batch=4 * n)
    torch.testing.assert_close(scaled * 4, base)


def test_gkd_never_keeps_vocabulary_sized_tensors_for_backward(monkeypatch):
    """What autograd saves for backward: the chunked loss keeps no (k, V) tensor of logits or probabilities.

    The same measurement on the loss without checkpointing finds about 10·n·V saved elements, so it can fail.
    """
    hs, ws, ht, wt, m = gkd_case(2, B=4, T=16, V=97)
    n, V = int(m.sum()), ws.shape[0]

    def saved_vocab_elements():
        seen = []

        def pack(x):
            if x.dim() == 2 and x.shape[-1] == V:
                seen.append(x.numel())
            return x
        w = t(ws).requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss, _ = gkd_loss(t(hs).requires_grad_(True), w, t(ht), t(wt), t(m), chunk_tokens=8)
        loss.backward()
        return sum(seen)

    assert saved_vocab_elements() == 0
    monkeypatch.setattr(distill, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
    assert saved_vocab_elements() >= n * V


def test_gkd_empty_mask_and_bad_input():
    hs, ws, ht, wt, m = gkd_case(3)
    hs_t, ws_t = t(hs).requires_grad_(True), t(ws).requires_grad_(True)
    loss, metrics = gkd_loss(hs_t, ws_t, t(ht), t(wt), t(np.zeros_like(m)))
    loss.backward()
    assert loss.item() == 0.0 and metrics["jsd"].item() == 0.0 and (hs_t.grad == 0).all() and (ws_t.grad == 0).all()
    with pytest.raises(ValueError, match="beta must be in"):
        gkd_loss(t(hs), t(ws), t(ht), t(wt), t(m), beta=1.5)
    with pytest.raises(ValueError, match="vocabularies differ"):
        gkd_loss(t(hs), t(ws), t(ht), t(wt[:5]), t(m))
    with pytest.raises(ValueError, match="hidden states must be"):
        gkd_loss(t(hs[:, :2]), t(ws), t(ht), t(wt), t(m))
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(t(hs[0]), t(hs[0]), 0.5, 0.0)


def test_per_token_advantages_may_hold_anything_on_padding():
    """(N, T) advantages come from other code (opd_advantages, a critic): padding values must not leak in."""
    lp, old, _, m = cispo_batch(4)
    adv = np.random.default_rng(12).normal(0, 1, lp.shape)
    junk = np.where(m > 0, adv, np.nan)
    for fn in (lambda x, a: gspo_loss(x, t(old), t(a), t(m), 0.2, 0.2), lambda x, a: cispo_loss(x, t(old), t(a), t(m))):
        clean, dirty = grad_of(lambda x: fn(x, adv), lp), grad_of(lambda x: fn(x, junk), lp)
        assert np.isfinite(dirty[0]) and np.isfinite(dirty[1]).all()
        np.testing.assert_allclose(dirty[0], clean[0], rtol=1e-14)
        np.testing.assert_allclose(dirty[1], clean[1], rtol=1e-14)
