"""Preference losses (DPO family, ORPO, CPO, SimPO, KTO) against numpy references written
independently from the torch code, their defining properties, and gradients on a tiny model."""
import math

import numpy as np
import pytest
import torch

from losses.common import token_logprobs
from losses.cpo import cpo_loss
from losses.dpo import dpo_loss
from losses.kto import kto_loss
from losses.orpo import orpo_loss
from losses.simpo import simpo_loss

ATOL = 1e-10


# ---------------------------------------------------------------- numpy references

def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_sig(x):
    return np.exp(np_logsig(x))


def np_sum(lp, m):
    return np.where(m > 0, lp, 0.0).sum(-1)


def np_avg(lp, m):
    return np_sum(lp, m) / np.maximum(m.sum(-1), 1)


def np_token_mean(lp, m):
    return np.where(m > 0, lp, 0.0).sum() / max(m.sum(), 1)


def np_pair_loss(h, beta, loss_type, eps):
    """Per-pair loss of the log-ratio margin h."""
    z = beta * h
    if loss_type == "sigmoid":  # cDPO / DPO
        return -(1 - eps) * np_logsig(z) - eps * np_logsig(-z)
    if loss_type == "robust":  # Chowdhury et al. 2024
        return ((1 - eps) * -np_logsig(z) - eps * -np_logsig(-z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - z)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise AssertionError(loss_type)


def np_dpo(pc, pr, rc, rr, mc, mr, beta, loss_type, eps, rpo_alpha=0.0):
    seq = np_avg if loss_type == "ipo" else np_sum
    lc, lr = seq(pc, mc) - seq(rc, mc), seq(pr, mr) - seq(rr, mr)
    nll = -np_token_mean(pc, mc)  # RPO: chosen NLL, a mean over every chosen token of the batch
    loss = np_pair_loss(lc - lr, beta, loss_type, eps).mean() + rpo_alpha * nll
    tok = np.concatenate([np.where(mc > 0, pc - rc, 0.0), np.where(mr > 0, pr - rr, 0.0)])
    metrics = {"rewards/chosen": (beta * lc).mean(), "rewards/rejected": (beta * lr).mean(),
               "rewards/margins": (beta * (lc - lr)).mean(), "rewards/accuracies": (lc > lr).mean(),
               "logps/chosen": seq(pc, mc).mean(), "logps/rejected": seq(pr, mr).mean(),
               "nll_loss": nll, "kl": tok.sum() / (mc.sum() + mr.sum())}
    return loss, metrics


def np_log1mexp(x):
    return np.log(-np.expm1(x))


def np_orpo(pc, pr, mc, mr, lam):
    ac, ar = np_avg(pc, mc), np_avg(pr, mr)
    nll = -np_token_mean(pc, mc)
    cc, rr = np.minimum(ac, -1e-6), np.minimum(ar, -1e-6)
    log_odds = (cc - np_log1mexp(cc)) - (rr - np_log1mexp(rr))
    loss = nll - lam * np_logsig(log_odds).mean()
    metrics = {"nll": nll, "log_odds_ratio": np_logsig(log_odds).mean(), "log_odds_chosen": log_odds.mean(),
               "rewards/chosen": lam * ac.mean(), "rewards/rejected": lam * ar.mean(),
               "rewards/accuracies": (ac > ar).mean(), "logps/chosen": ac.mean()}
    return loss, metrics


def np_cpo(pc, pr, mc, mr, beta, loss_type, eps, alpha):
    seq = np_avg if loss_type == "ipo" else np_sum
    sc, sr = seq(pc, mc), seq(pr, mr)
    nll = -np_token_mean(pc, mc)
    loss = np_pair_loss(sc - sr, beta, loss_type, eps).mean() + alpha * nll
    metrics = {"nll": nll, "rewards/chosen": beta * sc.mean(), "rewards/rejected": beta * sr.mean(),
               "rewards/margins": beta * (sc - sr).mean(), "rewards/accuracies": (sc > sr).mean()}
    return loss, metrics


def np_simpo(pc, pr, mc, mr, beta, gamma, eps):
    ac, ar = np_avg(pc, mc), np_avg(pr, mr)
    z = beta * (ac - ar) - gamma
    loss = (-(1 - eps) * np_logsig(z) - eps * np_logsig(-z)).mean()
    metrics = {"rewards/chosen": beta * ac.mean(), "rewards/rejected": beta * ar.mean(),
               "rewards/accuracies": (ac > ar).mean()}
    return loss, metrics


def np_kto(p, r, m, labels, kp, kr, km, beta, wd, wu):
    rew = np_sum(p, m) - np_sum(r, m)
    z0 = max(0.0, (np_sum(kp, km) - np_sum(kr, km)).mean())
    per = np.where(labels, wd * (1 - np_sig(beta * (rew - z0))), wu * (1 - np_sig(beta * (z0 - rew))))
    rc = (beta * rew[labels]).mean() if labels.any() else 0.0
    rr = (beta * rew[~labels]).mean() if (~labels).any() else 0.0
    return per.mean(), {"kl": z0, "rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr}


# ---------------------------------------------------------------- random inputs

def rand_batch(seed, B=5, T=9, n=2):
    """n per-token log-prob arrays and masks: prompt zeros, completion ones, right padding.
    Masked positions hold garbage (+30) so a missing mask shows."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = np.zeros((B, T))
        for b in range(B):
            s = rng.integers(0, 3)
            m[b, s:s + rng.integers(1, T - s + 1)] = 1
        lp = np.where(m > 0, -rng.uniform(0.01, 4.0, (B, T)), 30.0)
        out.append((lp, m))
    return out


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def check(loss, metrics, ref_loss, ref_metrics):
    np.testing.assert_allclose(loss.item(), ref_loss, atol=ATOL, rtol=0)
    for k, v in ref_metrics.items():
        np.testing.assert_allclose(metrics[k].item(), v, atol=ATOL, rtol=0, err_msg=k)
    assert all(not v.requires_grad for v in metrics.values())


def ref_logps(pc, mc, seed):
    """Reference log-probs near the policy ones (so log-ratios are O(0.3) per token)."""
    rng = np.random.default_rng(seed)
    return np.where(mc > 0, pc + rng.normal(0, 0.3, pc.shape), -7.0)


# ---------------------------------------------------------------- numpy parity

@pytest.mark.parametrize("loss_type,eps,beta", [("sigmoid", 0.0, 0.1), ("sigmoid", 0.2, 0.5), ("robust", 0.2, 0.5),
                                                ("robust", 0.0, 0.1), ("hinge", 0.0, 0.3), ("ipo", 0.0, 0.1),
                                                ("ipo", 0.0, 2.0)])
def test_dpo_matches_numpy(loss_type, eps, beta):
    (pc, mc), (pr, mr) = rand_batch(0)
    rc, rr = ref_logps(pc, mc, 1), ref_logps(pr, mr, 2)
    loss, metrics = dpo_loss(t(pc), t(pr), t(rc), t(rr), t(mc), t(mr), beta=beta, loss_type=loss_type,
                             label_smoothing=eps)
    check(loss, metrics, *np_dpo(pc, pr, rc, rr, mc, mr, beta, loss_type, eps))


@pytest.mark.parametrize("loss_type,alpha", [("sigmoid", 1.0), ("sigmoid", 0.3), ("ipo", 1.0)])
def test_rpo_matches_numpy(loss_type, alpha):
    (pc, mc), (pr, mr) = rand_batch(21)
    rc, rr = ref_logps(pc, mc, 22), ref_logps(pr, mr, 23)
    loss, metrics = dpo_loss(t(pc), t(pr), t(rc), t(rr), t(mc), t(mr), beta=0.1, loss_type=loss_type, rpo_alpha=alpha)
    check(loss, metrics, *np_dpo(pc, pr, rc, rr, mc, mr, 0.1, loss_type, 0.0, rpo_alpha=alpha))


def test_rpo_term_holds_the_chosen_answer_up():
    """RPO's NLL term: at alpha=0 it is plain DPO; with alpha>0 the gradient on the chosen log-probs
    gains exactly alpha/n_chosen_tokens per token (pushing the chosen answer up even where DPO's
    margin term has saturated), and the rejected gradient is unchanged."""
    (pc, mc), (pr, mr) = rand_batch(24)
    rc, rr = ref_logps(pc, mc, 25), ref_logps(pr, mr, 26)
    plain, _ = dpo_loss(t(pc), t(pr), t(rc), t(rr), t(mc), t(mr))
    zero, _ = dpo_loss(t(pc), t(pr), t(rc), t(rr), t(mc), t(mr), rpo_alpha=0.0)
    assert zero.item() == plain.item()
    grads = []
    for alpha in (0.0, 2.0):
        c, r = t(pc).requires_grad_(), t(pr).requires_grad_()
        dpo_loss(c, r, t(rc), t(rr), t(mc), t(mr), rpo_alpha=alpha)[0].backward()
        grads.append((c.grad.numpy(), r.grad.numpy()))
    np.testing.assert_allclose(grads[1][0] - grads[0][0], np.where(mc > 0, -2.0 / mc.sum(), 0.0), atol=1e-12)
    np.testing.assert_allclose(grads[1][1], grads[0][1], atol=1e-12)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_matches_numpy(lam):
    (pc, mc), (pr, mr) = rand_batch(3)
    check(*orpo_loss(t(pc), t(pr), t(mc), t(mr), lam=lam), *np_orpo(pc, pr, mc, mr, lam))
    # completions the model is (almost) certain of: p̄ = 0 and p̄ just below 0 hit the clamp
    pc2 = np.where(mc > 0, 0.0, 30.0)
    pc2[0] = np.where(mc[0] > 0, -1e-9, 30.0)
    check(*orpo_loss(t(pc2), t(pr), t(mc), t(mr), lam=lam), *np_orpo(pc2, pr, mc, mr, lam))


@pytest.mark.parametrize("loss_type,eps,beta,alpha", [("sigmoid", 0.0, 0.1, 1.0), ("sigmoid", 0.1, 0.5, 0.3),
                                                      ("hinge", 0.0, 0.2, 1.0), ("ipo", 0.0, 0.1, 0.0)])
def test_cpo_matches_numpy(loss_type, eps, beta, alpha):
    (pc, mc), (pr, mr) = rand_batch(4)
    loss, metrics = cpo_loss(t(pc), t(pr), t(mc), t(mr), beta=beta, loss_type=loss_type, label_smoothing=eps,
                             alpha=alpha)
    check(loss, metrics, *np_cpo(pc, pr, mc, mr, beta, loss_type, eps, alpha))


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.1)])
def test_simpo_matches_numpy(beta, gamma, eps):
    (pc, mc), (pr, mr) = rand_batch(5)
    check(*simpo_loss(t(pc), t(pr), t(mc), t(mr), beta=beta, gamma=gamma, label_smoothing=eps),
          *np_simpo(pc, pr, mc, mr, beta, gamma, eps))


@pytest.mark.parametrize("wd,wu,beta", [(1.0, 1.0, 0.1), (1.33, 1.0, 0.5)])
def test_kto_matches_numpy(wd, wu, beta):
    (p, m), (kp, km) = rand_batch(6, B=6)
    r, kr = ref_logps(p, m, 7), ref_logps(kp, km, 8) - 0.2 * km  # raw KL estimate positive
    labels = np.array([True, False, True, True, False, False])
    ref_loss, ref_metrics = np_kto(p, r, m, labels, kp, kr, km, beta, wd, wu)
    assert ref_metrics["kl"] > 0
    loss, metrics = kto_loss(t(p), t(r), t(m), torch.tensor(labels), t(kp), t(kr), t(km), beta=beta,
                             desirable_weight=wd, undesirable_weight=wu)
    check(loss, metrics, ref_loss, ref_metrics)


# ---------------------------------------------------------------- properties

def seq_batch(margins, T=4):
    """Pairs whose chosen-minus-rejected summed log-prob equals `margins` (rejected fixed at -1/token)."""
    margins = torch.as_tensor(margins, dtype=torch.float64)
    B = len(margins)
    m = torch.ones(B, T, dtype=torch.float64)
    rej = -torch.ones(B, T, dtype=torch.float64)
    cho = rej + (margins / T)[:, None]
    return cho, rej, m


ALL_LOSSES = {
    **{f"dpo-{lt}": (lambda c, r, m, lt=lt: dpo_loss(c, r, torch.zeros_like(c), torch.zeros_like(r), m, m,
                                                     loss_type=lt, label_smoothing=0.1 if lt in ("sigmoid", "robust") else 0.0))
       for lt in ("sigmoid", "robust", "hinge", "ipo")},
    "rpo": lambda c, r, m: dpo_loss(c, r, torch.zeros_like(c), torch.zeros_like(r), m, m, rpo_alpha=1.0),
    **{f"cpo-{lt}": (lambda c, r, m, lt=lt: cpo_loss(c, r, m, m, loss_type=lt)) for lt in ("sigmoid", "hinge", "ipo")},
    "simpo": lambda c, r, m: simpo_loss(c, r, m, m, label_smoothing=0.1),
    "orpo": lambda c, r, m: orpo_loss(c, r, m, m),
}


def test_dpo_beta_zero_is_ln2():
    (pc, mc), (pr, mr) = rand_batch(9)
    loss, _ = dpo_loss(t(pc), t(pr), t(pc) * 0.5, t(pr) * 2, t(mc), t(mr), beta=0.0)
    assert abs(loss.item() - math.log(2)) < 1e-12


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_swapping_chosen_and_rejected_raises_the_loss(name):
    cho, rej, m = seq_batch([2.0, 0.7, 3.0])  # positive margins, inside the hinge margin
    if name.startswith("orpo") or name.startswith("simpo"):
        cho, rej = cho - 0.5, rej - 0.5  # keep a clear gap below log p = 0
    loss, _ = ALL_LOSSES[name](cho, rej, m)
    swapped, _ = ALL_LOSSES[name](rej, cho, m)
    assert swapped.item() > loss.item()


def test_kto_flipping_labels_raises_the_loss():
    p = torch.tensor([[-1.0, -1.0], [-2.0, -1.0]], dtype=torch.float64)
    ref = p - 3.0  # r = 6 > z0 for every example
    m, lab = torch.ones_like(p), torch.tensor([True, True])
    kl = (p, p, m)  # z0 = 0
    good, _ = kto_loss(p, ref, m, lab, *kl)
    bad, _ = kto_loss(p, ref, m, ~lab, *kl)
    assert bad.item() > good.item()


@pytest.mark.parametrize("name", sorted(ALL_LOSSES) + ["kto"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_margins_are_finite(name, sign):
    T = 3
    if name == "orpo":  # log-probs must stay ≤ 0: one side certain (0, on the clamp), the other -1e4
        big, small = torch.zeros(2, T, dtype=torch.float64), torch.full((2, T), -1e4, dtype=torch.float64)
        cho, rej = (big, small) if sign > 0 else (small, big)
        m = torch.ones(2, T, dtype=torch.float64)
    else:
        cho, rej, m = seq_batch([sign * 1e4, sign * 3e4], T=T)
    cho, rej = cho.clone().requires_grad_(), rej.clone().requires_grad_()
    if name == "kto":
        p = torch.cat([cho, rej])
        loss, metrics = kto_loss(p, torch.zeros_like(p), torch.cat([m, m]), torch.tensor([True, True, False, False]),
                                 p.detach(), torch.zeros_like(p), torch.cat([m, m]))
    else:
        loss, metrics = ALL_LOSSES[name](cho, rej, m)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(cho.grad).all() and torch.isfinite(rej.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_simpo_gamma_shifts_the_margin():
    (pc, mc), (pr, mr) = rand_batch(10)
    beta, gamma = 2.5, 0.8
    with_gamma, _ = simpo_loss(t(pc), t(pr), t(mc), t(mr), beta=beta, gamma=gamma)
    shifted, _ = simpo_loss(t(pc) - gamma / beta, t(pr), t(mc), t(mr), beta=beta, gamma=0.0)
    assert abs(with_gamma.item() - shifted.item()) < 1e-12
    no_gamma, _ = simpo_loss(t(pc), t(pr), t(mc), t(mr), beta=beta, gamma=0.0)
    assert with_gamma.item() > no_gamma.item()


def test_orpo_with_lambda_zero_is_the_nll():
    (pc, mc), (pr, mr) = rand_batch(11)
    loss, metrics = orpo_loss(t(pc), t(pr), t(mc), t(mr), lam=0.0)
    np.testing.assert_allclose(loss.item(), -np_token_mean(pc, mc), atol=ATOL, rtol=0)
    assert metrics["nll"].item() == loss.item()


def test_kto_reference_point_clamped_and_without_gradient():
    (p, m), (kp, km) = rand_batch(12, B=4)
    r = ref_logps(p, m, 13)
    labels = torch.tensor([True, False, True, False])
    kr = kp + 0.5 * km  # policy below reference on the mismatched pairs: raw estimate < 0
    assert (np_sum(kp, km) - np_sum(kr, km)).mean() < 0
    P, KP = t(p).requires_grad_(), t(kp).requires_grad_()
    loss, metrics = kto_loss(P, t(r), t(m), labels, KP, t(kr), t(km))
    assert metrics["kl"].item() == 0.0
    np.testing.assert_allclose(loss.item(), np_kto(p, r, m, labels.numpy(), kp, kr, km, 0.1, 1, 1)[0], atol=ATOL)
    # the reference point is a constant: no gradient reaches the kl_* inputs, clamped or not
    for kr_ in (kr, kp - 0.5 * km):
        loss, metrics = kto_loss(P, t(r), t(m), labels, KP, t(kr_), t(km))
        assert metrics["kl"].item() >= 0
        gp, gk = torch.autograd.grad(loss, [P, KP], allow_unused=True)
        assert gk is None and gp.abs().sum() > 0


def test_kto_one_sided_batch_has_no_nan():
    (p, m), (kp, km) = rand_batch(14, B=3)
    for labels in ([True] * 3, [False] * 3):
        loss, metrics = kto_loss(t(p), t(p) - 0.1, t(m), torch.tensor(labels), t(kp), t(kp), t(km))
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
        empty = "rewards/rejected" if labels[0] else "rewards/chosen"
        assert metrics[empty].item() == 0.0


def test_ipo_is_length_normalised():
    (pc, mc), (pr, mr) = rand_batch(15)
    rc, rr = ref_logps(pc, mc, 16), ref_logps(pr, mr, 17)
    args = [t(x) for x in (pc, pr, rc, rr, mc, mr)]
    doubled = [torch.cat([x, x], dim=1) for x in args]  # every completion twice as long, same per-token log-probs
    ipo, ipo2 = dpo_loss(*args, loss_type="ipo")[0], dpo_loss(*doubled, loss_type="ipo")[0]
    sig, sig2 = dpo_loss(*args)[0], dpo_loss(*doubled)[0]
    assert abs(ipo.item() - ipo2.item()) < 1e-12
    assert abs(sig.item() - sig2.item()) > 1e-3
    c = [args[0], args[1], args[4], args[5]]
    c2 = [doubled[0], doubled[1], doubled[4], doubled[5]]
    assert abs(cpo_loss(*c, loss_type="ipo")[0].item() - cpo_loss(*c2, loss_type="ipo")[0].item()) < 1e-12


def test_hinge_is_zero_past_the_margin():
    beta = 0.5
    cho, rej, m = seq_batch([2.0, 2.5, 10.0])  # beta * margin >= 1 for every pair
    cho.requires_grad_()
    zeros = torch.zeros_like(cho)
    loss, _ = dpo_loss(cho, rej, zeros, zeros, m, m, beta=beta, loss_type="hinge")
    loss.backward()
    assert loss.item() == 0.0 and cho.grad.abs().sum() == 0
    assert cpo_loss(cho, rej, m, m, beta=beta, loss_type="hinge", alpha=0.0)[0].item() == 0.0
    inside, _ = dpo_loss(cho, rej, zeros, zeros, m, m, beta=beta * 0.25, loss_type="hinge")
    assert inside.item() > 0


def test_reward_accuracies_hand_case():
    # sequence margins +1, -2, 0 (a tie is not a win), +0.5 -> 2 of 4
    cho, rej, m = seq_batch([1.0, -2.0, 0.0, 0.5])
    zeros = torch.zeros_like(cho)
    assert dpo_loss(cho, rej, zeros, zeros, m, m)[1]["rewards/accuracies"].item() == 0.5
    assert cpo_loss(cho, rej, m, m)[1]["rewards/accuracies"].item() == 0.5
    assert simpo_loss(cho, rej, m, m)[1]["rewards/accuracies"].item() == 0.5
    assert orpo_loss(cho - 1, rej - 1, m, m)[1]["rewards/accuracies"].item() == 0.5
    # DPO: the reference can turn a policy win into a loss
    ref_c = torch.tensor([[0.0], [0.0], [0.0], [0.25]]).expand_as(cho)  # pair 3: ref favours chosen by 1 > 0.5
    _, metrics = dpo_loss(cho, rej, ref_c, zeros, m, m)
    assert metrics["rewards/accuracies"].item() == 0.25


def test_bad_arguments_are_rejected():
    cho, rej, m = seq_batch([1.0])
    z = torch.zeros_like(cho)
    for kw in (dict(loss_type="nope"), dict(loss_type="ipo", label_smoothing=0.1),
               dict(loss_type="robust", label_smoothing=0.5), dict(loss_type="sigmoid", label_smoothing=0.7),
               dict(rpo_alpha=-1.0)):
        with pytest.raises(ValueError):
            dpo_loss(cho, rej, z, z, m, m, **kw)
    with pytest.raises(ValueError):
        cpo_loss(cho, rej, m, m, loss_type="hinge", label_smoothing=0.1)


# ---------------------------------------------------------------- gradients on a tiny model

@pytest.fixture(scope="module")
def tiny():
    """A 1-layer fp64 Transformer, 2 prompts x (chosen, rejected) and their mismatched pairs."""
    from model.config import ModelConfig
    from model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen3", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = Transformer(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 32, (2, 3), generator=g).repeat(2, 1)  # rows 0,1 chosen; 2,3 rejected
    comps = torch.randint(0, 32, (4, 5), generator=g)
    comp_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    ids = torch.cat([prompts, comps], 1)
    mask = torch.cat([torch.zeros(4, 3, dtype=torch.long), comp_mask], 1)
    kl_ids = torch.cat([prompts, comps.roll(1, 0)], 1)  # prompt i with completion of i-1
    kl_mask = torch.cat([torch.zeros(4, 3, dtype=torch.long), comp_mask.roll(1, 0)], 1)
    return model, ids, mask[:, 1:].double(), kl_ids, kl_mask[:, 1:].double()


def tiny_logps(model, ids, norm_w, head_row):
    """Per-token log-probs (B, T-1) as functions of the final norm weight and lm_head row 0."""
    head = torch.cat([head_row[None], model.lm_head.weight.detach()[1:]])
    hidden = torch.func.functional_call(model, {"model.norm.weight": norm_w, "lm_head.weight": head}, (ids,),
                                        {"hidden_only": True})
    return token_logprobs(hidden[:, :-1], head, ids[:, 1:])


TINY_LOSSES = {
    **{f"dpo-{lt}": (lambda pol, ref, m, lt=lt: dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], m[:2], m[2:],
                                                         beta=0.5, loss_type=lt,
                                                         label_smoothing=0.2 if lt in ("sigmoid", "robust") else 0.0))
       for lt in ("sigmoid", "robust", "hinge", "ipo")},
    "rpo": lambda pol, ref, m: dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], m[:2], m[2:], beta=0.5, rpo_alpha=1.0),
    **{f"cpo-{lt}": (lambda pol, ref, m, lt=lt: cpo_loss(pol[:2], pol[2:], m[:2], m[2:], loss_type=lt))
       for lt in ("sigmoid", "hinge", "ipo")},
    "simpo": lambda pol, ref, m: simpo_loss(pol[:2], pol[2:], m[:2], m[2:]),
    "orpo": lambda pol, ref, m: orpo_loss(pol[:2], pol[2:], m[:2], m[2:], lam=0.5),
}


def directional_derivatives(f, xs, dirs, eps=1e-6):
    """Central finite differences of the scalar f(*xs) along each direction (a tuple like xs)."""
    with torch.no_grad():
        return [(f(*(x + eps * d for x, d in zip(xs, ds))) - f(*(x - eps * d for x, d in zip(xs, ds)))).item()
                / (2 * eps) for ds in dirs]


@pytest.mark.parametrize("name", sorted(TINY_LOSSES) + ["kto"])
def test_gradients_match_finite_differences_on_a_tiny_model(tiny, name):
    """Autograd gradient w.r.t. the final norm weight and one lm_head row against central differences
    along 4 coordinate directions and one random direction through both (fp64 end to end after the
    backbone, so differences are exact to ~1e-10)."""
    model, ids, mask, kl_ids, kl_mask = tiny
    w0, row0 = model.model.norm.weight.detach().clone(), model.lm_head.weight.detach()[0].clone()
    labels = torch.tensor([True, True, False, False])
    with torch.no_grad():  # a reference model that differs from the policy
        ref = tiny_logps(model, ids, w0 * 1.3, row0 * 0.5)
        kl_ref = tiny_logps(model, kl_ids, w0 * 1.3, row0 * 0.5)
        kl_pol0 = tiny_logps(model, kl_ids, w0, row0)

    def f(norm_w, head_row, kl_in_graph=False):
        pol = tiny_logps(model, ids, norm_w, head_row)
        if name == "kto":  # KTO's gradient holds z0 fixed, so finite differences must too
            kl_pol = tiny_logps(model, kl_ids, norm_w, head_row) if kl_in_graph else kl_pol0
            return kto_loss(pol, ref, mask, labels, kl_pol, kl_ref, kl_mask, beta=0.5)[0]
        return TINY_LOSSES[name](pol, ref, mask)[0]

    w, row = w0.clone().requires_grad_(), row0.clone().requires_grad_()
    gw, grow = torch.autograd.grad(f(w, row), [w, row])
    assert gw.abs().min() > 0 and grow.abs().sum() > 0  # the check is not vacuous
    g = torch.Generator().manual_seed(2)
    e = torch.eye(16, dtype=torch.float64)
    dirs = [(e[0], 0 * row0), (e[7], 0 * row0), (0 * w0, e[3]), (0 * w0, e[11]),
            (torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64))]
    numeric = directional_derivatives(f, (w0, row0), dirs)
    analytic = [(gw @ dw + grow @ dr).item() for dw, dr in dirs]
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
    if name == "kto":  # z0 computed from the policy in the graph still sends no gradient
        gw2, grow2 = torch.autograd.grad(f(w, row, kl_in_graph=True), [w, row])
        torch.testing.assert_close(gw2, gw, rtol=0, atol=0)
        torch.testing.assert_close(grow2, grow, rtol=0, atol=0)
