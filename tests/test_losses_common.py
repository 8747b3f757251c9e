"""losses/common.py and losses/sft.py against numpy references written independently."""
import numpy as np
import torch

from losses.common import masked_mean, masked_sum, token_logprobs
from losses.sft import sft_loss


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_logprobs_matches_numpy_and_full_softmax_in_chunks():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=g, dtype=torch.float64)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (3, 7), generator=g)
    ref = np.take_along_axis(np_log_softmax(h.numpy() @ w.numpy().T), y.numpy()[..., None], -1)[..., 0]
    for chunk in (1, 5, 21, None):  # chunks smaller than, not dividing, and covering B*T
        lp = token_logprobs(h, w, y, chunk_tokens=chunk)
        np.testing.assert_allclose(lp.numpy(), ref, atol=1e-10)
    # temperature divides the logits before the softmax
    ref_t = np.take_along_axis(np_log_softmax(h.numpy() @ w.numpy().T / 0.7), y.numpy()[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logprobs(h, w, y, temperature=0.7, chunk_tokens=4).numpy(), ref_t, atol=1e-10)


def test_token_logprobs_entropy_matches_numpy():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 30, (2, 5), generator=g)
    _, ent = token_logprobs(h, w, y, chunk_tokens=3, with_entropy=True)
    lp = np_log_softmax(h.numpy() @ w.numpy().T)
    np.testing.assert_allclose(ent.numpy(), -(np.exp(lp) * lp).sum(-1), atol=1e-10)


def test_chunked_gradients_equal_unchunked():
    g = torch.Generator().manual_seed(2)
    h0, w0 = torch.randn(2, 9, 8, generator=g, dtype=torch.float64), torch.randn(40, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 40, (2, 9), generator=g)
    grads = []
    for chunk in (4, 10_000):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        token_logprobs(h, w, y, chunk_tokens=chunk).sum().backward()
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    # and they equal the plain full-logits autograd
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None]).sum().backward()
    torch.testing.assert_close(grads[0][0], h.grad)
    torch.testing.assert_close(grads[0][1], w.grad)


def test_masked_reductions():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert masked_sum(x, m).item() == 4.0
    assert masked_mean(x, m).item() == 2.0
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([2.0, 0.0]))  # empty row -> 0, not NaN


def test_sft_loss_is_per_token_mean_nll():
    rng = np.random.default_rng(0)
    logp = -rng.random((4, 6))
    mask = (rng.random((4, 6)) > 0.3).astype(np.float64)
    loss, metrics = sft_loss(torch.tensor(logp), torch.tensor(mask))
    expected = -(logp * mask).sum() / mask.sum()
    assert abs(loss.item() - expected) < 1e-12
    assert metrics["trained_tokens"].item() == mask.sum()


def test_gradients_with_temperature_and_weighting_match_plain_autograd():
    g = torch.Generator().manual_seed(3)
    h0, w0 = torch.randn(2, 6, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 30, (2, 6), generator=g)
    coef = torch.randn(2, 6, generator=g, dtype=torch.float64)  # a non-uniform upstream gradient
    for chunk in (5, None):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        (token_logprobs(h, w, y, temperature=0.7, chunk_tokens=chunk) * coef).sum().backward()
        h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        (torch.log_softmax(h2 @ w2.T / 0.7, -1).gather(-1, y[..., None]).squeeze(-1) * coef).sum().backward()
        torch.testing.assert_close(h.grad, h2.grad)
        torch.testing.assert_close(w.grad, w2.grad)


class _Head(torch.nn.Module):
    """The smallest 'model' sequence_logprobs accepts: an embedding as hidden states and a head."""

    def __init__(self, vocab=11, hidden=6):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.lm_head_weight = torch.nn.Parameter(torch.randn(vocab, hidden))

    def forward(self, ids, attention_mask=None, hidden_only=True):
        return self.emb(ids)


def test_sequence_logprobs_scores_only_masked_positions_with_full_softmax_values():
    from losses.common import sequence_logprobs

    torch.manual_seed(0)
    model = _Head()
    ids = torch.randint(0, 11, (3, 7))
    loss_mask = torch.zeros_like(ids)
    loss_mask[0, 2:] = 1
    loss_mask[1, 5:] = 1  # row 2: nothing trained
    logp, mask = sequence_logprobs(model, ids, loss_mask)
    full = torch.log_softmax(model.emb(ids)[:, :-1] @ model.lm_head_weight.t(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(logp, full * mask)  # the real values where trained, 0 elsewhere
    (logp * mask).sum().backward()
    g = model.lm_head_weight.grad.clone()
    model.zero_grad()
    (full * mask).sum().backward()
    torch.testing.assert_close(g, model.lm_head_weight.grad)
    # no trained token at all: zeros, and backward still runs
    logp, mask = sequence_logprobs(model, ids, torch.zeros_like(ids))
    assert logp.shape == (3, 6) and logp.abs().sum() == 0
    (logp * mask).sum().backward()
