"""trainer/feeds/nash_md.py: Nash-MD batches (policy vs mixture samples) on the embedded model."""
import copy

import pytest
import torch

from conftest import make_feed
from losses.nash_md import nash_md_loss
from rollout.rewards import register
from trainer.config import ConfigError, compose
from trainer.feeds.nash_md import compare_preference
from trainer.forward import completion_logprobs


@pytest.fixture(scope="module")
def models(tiny):
    model, tok = tiny
    return model, copy.deepcopy(model).eval().requires_grad_(False), tok


def feed(tok, ref, rank=0, world=1, **kw):
    opts = {**dict(reward="[math_answer]", num_generations=2, prompts_per_step=3, max_new_tokens=12,
                   micro_batch_size=4), **kw}
    f = make_feed(["method=nash_md", *[f"method.{k}={v}" for k, v in opts.items()]], tok, n_rows=12)
    f.rank, f.world = rank, world
    f.use_reference(ref)
    return f


def test_compare_preference():
    p = compare_preference(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert p.tolist() == [1.0, 0.0, 0.5, 0.5]


def test_step_gives_policy_samples_with_preferences_and_loss_inputs(models):
    model, ref, tok = models
    f = feed(tok, ref)
    step = f.next_step(model)
    micro, metrics = step.micro_batches, step.metrics
    assert [len(mb) for mb in micro] == [4, 2] and step.weights == [4 / 6, 2 / 6]
    for key in ("reward", "reward_mixture", "win_rate", "tie_rate", "rewards/math_answer/mean",
                "rewards/math_answer/mixture", "completion_length/mean", "rollout_s"):
        assert key in metrics
    prefs = torch.stack([s.preference for mb in micro for s in mb])
    assert set(prefs.tolist()) <= {0.0, 0.5, 1.0}
    # the preference is the comparison of the policy sample's reward with the mixture sample's
    assert prefs.mean().item() == pytest.approx(0.5 + 0.5 * (metrics["win_rate"] - (1 - metrics["win_rate"] - metrics["tie_rate"])))
    for mb in micro:
        inputs, ntok, extra = f.loss_inputs(model, ref, mb)
        assert inputs["policy_logps"].requires_grad and not inputs["ref_logps"].requires_grad
        m = inputs["mask"]
        # the policy is its own reference at the start: log-ratios are zero on the completion
        torch.testing.assert_close(inputs["policy_logps"] * m, inputs["ref_logps"] * m, atol=1e-5, rtol=0)
        # the log-probs are those of the sampled completion tokens y (what the loss trains on)
        seq_lp = completion_logprobs(model, [s.prompt_len for s in mb], [s.seq for s in mb], m.shape[1],
                                     tok.pad_token_id)
        torch.testing.assert_close((inputs["policy_logps"] * m).detach(), seq_lp.detach() * m)
        assert ntok == sum(len(s.seq) for s in mb) and extra["entropy"] > 0
        loss, lm = nash_md_loss(**inputs, beta=0.1)
        loss.backward()
        assert torch.isfinite(loss) and "rewards/probabilities" in lm
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_reward_model_style_rewards_give_sigmoid_preferences(models):
    model, ref, tok = models

    @register("nash_md_test_length")
    def length(prompts, completions, **fields):
        return [len(c) / 10 for c in completions]

    step = feed(tok, ref, reward="[nash_md_test_length]", preference="sigmoid").next_step(model)
    prefs = torch.stack([s.preference for mb in step.micro_batches for s in mb])
    assert ((prefs > 0) & (prefs < 1)).all()


def test_needs_a_reference_and_a_valid_coefficient():
    with pytest.raises(ConfigError, match="reference"):
        compose(["method=nash_md", "method.reference=false"])
    with pytest.raises(ConfigError, match="mixture_coef"):
        compose(["method=nash_md", "method.mixture_coef=1.5"])


def test_ranks_split_the_step_prompts_and_sample_with_their_own_seeds(models):
    """Under torchrun each rank takes its share of the step's prompts (as GRPO's feed does), so N
    processes do the work of one with N times the prompts, not N copies of the same batch."""
    model, ref, tok = models
    one = feed(tok, ref, prompts_per_step=4)
    ranks = [feed(tok, ref, rank=r, world=2, prompts_per_step=2) for r in (0, 1)]
    whole = one.draw(4)
    shares = [f.draw(2) for f in ranks]
    assert sorted(shares[0] + shares[1]) == sorted(whole) and not set(shares[0]) & set(shares[1])
    a, b = (f.collect(model)[0] for f in ranks)
    assert len(a) == len(b) == 2 * 2  # 2 prompts x 2 samples on each rank
    assert [s.seq[:s.prompt_len] for s in a[::2]] != [s.seq[:s.prompt_len] for s in b[::2]]
