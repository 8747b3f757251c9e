"""The KV-cached, batched sampler that RL rollouts run on.

Why it is built this way (gpt-fast style, but for many prompts x many samples):

* One static cache. `KVCache` is preallocated for prompt_len + max_new_tokens slots and every decode
  step writes one slot for every row, so nothing is reallocated or concatenated while generating.
* Left padding. Prompts of different lengths are left-padded so they all end at the same slot and
  the next token of every row lands in the same slot. `attention_mask` on the prefill tells the model
  which slots are pads (it builds per-row position ids and the attention mask from `cache.mask`).
* Prefill once per prompt. GRPO-style methods draw G samples per prompt. The prompts are prefilled
  with B rows and the cache is then `repeat_interleave`d to B*G rows, so a prompt's keys/values
  are computed once, not G times. Only the last position is projected to the vocabulary
  (`hidden_only=True` + `lm_head_weight`), never a B x T x V prefill logits tensor.
* Log-probs for free. The policy-gradient losses need log pi_old(token); the sampler already has
  the logits, so it returns log_softmax(logits / T) at each sampled token. They are taken *before*
  top-k / top-p / min-p filtering, so they equal what a training forward at the same temperature
  computes (the filters only change which token is drawn, not the policy being trained).
* Stopping. A row ends at a stop token (kept, mask 1) or when a stop string appears in its decoded
  completion (checked only on unfinished rows, decoding a short tail of tokens); afterwards it emits
  pad_id with mask 0. The loop ends when every row has ended, or at max_new_tokens.
* Reproducible. Sampling draws from a `torch.Generator` seeded by `seed` on the model's device.
* Geometric mixtures (Nash-MD). With `mixture_model` (the reference) the same loop runs that model
  in lockstep with its own static cache: one prefill per prompt, one token per step, the same tokens
  fed to both. Each step draws from log_softmax((1 - c)·log pi + c·log pi_ref) (losses/nash_md.py
  `mixture_logits`, c = `mixture_coef`), then temperature and filters apply to that as to any logits.
  The returned log-probs are then those of the mixture. c = 0 samples the policy, c = 1 the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer import distributed
from losses.nash_md import mixture_logits
from model.transformer import KVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0      # 0 => greedy
    top_k: int = 0                # 0 => off
    top_p: float = 1.0            # 1 => off
    min_p: float = 0.0            # 0 => off
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingConfig.min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(s for s in self.stop_strings if s)


@dataclass
class Rollout:
    prompt_ids: list[list[int]]   # the prompts as given (one per prompt, not per sample)
    completion_ids: torch.Tensor  # (N, T) long; row i*num_samples+j = sample j of prompt i; pad_id after the end
    logprobs: torch.Tensor        # (N, T) float32 log-prob of each token under softmax(logits / T); 0 where mask is 0
    mask: torch.Tensor            # (N, T) float32: 1 on completion tokens up to and including the stop token
    truncated: torch.Tensor       # (N,) bool: hit max_new_tokens without a stop token / stop string
    stop_strings: tuple[str, ...] = ()

    def texts(self, tokenizer) -> list[str]:
        """Decoded completions: special tokens skipped, each cut before the first stop string."""
        out = []
        for ids, m in zip(self.completion_ids.tolist(), self.mask.tolist()):
            text = tokenizer.decode([t for t, keep in zip(ids, m) if keep], skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=len(text))
            out.append(text[:cut])
        return out


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf the logits (N, V) that top-k, then top-p (nucleus), then min-p drop.

    top-p keeps the smallest set of most likely tokens whose mass is >= top_p; min-p drops tokens with
    p < min_p * p_max. Each filter always keeps the most likely token, so no row is ever empty.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p  # mass before this token already reaches top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None):
    """Draw one token per row from fp32 logits (N, V); returns (tokens (N,), their unfiltered log-probs (N,))."""
    if config.temperature == 0:
        logp = logits.log_softmax(-1)
        tokens = logits.argmax(-1)
    else:
        logits = logits / config.temperature
        logp = logits.log_softmax(-1)
        probs = filter_logits(logits, config.top_k, config.top_p, config.min_p).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], config: SamplingConfig, stop_token_ids: list[int], pad_id: int,
             num_samples: int = 1, seed: int | None = None, tokenizer=None, mixture_model=None,
             mixture_coef: float = 0.5) -> Rollout:
    """Sample `num_samples` completions for each prompt (token-id lists, any lengths) with a KV cache.

    Rows of the result are prompt-major: row i*num_samples+j is sample j of prompt i. A row ends at a
    token in `stop_token_ids` (included, mask 1) or when one of `config.stop_strings` appears in its
    decoded completion (needs `tokenizer`); the token that completes the stop string is the last with
    mask 1. The model runs in eval mode for the call and gets its training flag back afterwards.

    With `mixture_model` (same vocabulary; a frozen copy, or anything callable like the model such as
    train.py's AdaptersDisabled), tokens are drawn from the geometric mixture of the two models'
    next-token distributions with weight `mixture_coef` on `mixture_model` (see the module doc).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt must have at least one token (got an empty prompt list or prompt)")
    if num_samples < 1:
        raise ValueError(f"generate: num_samples must be >= 1, got {num_samples}")
    if not 0 <= pad_id < model.config.vocab_size:
        raise ValueError(f"generate: pad_id={pad_id} is not a token id of the model (vocab_size={model.config.vocab_size})")
    if config.stop_strings and tokenizer is None:
        raise ValueError(f"generate: stop_strings {config.stop_strings} need a tokenizer to decode completions")
    if mixture_model is not None and mixture_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"generate: mixture_model has vocab_size {mixture_model.config.vocab_size}, the model "
                         f"{model.config.vocab_size}: a token-level mixture needs one vocabulary")
    weight = model.model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    B, N, P = len(prompts), len(prompts) * num_samples, max(len(p) for p in prompts)
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, P, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at slot P - 1
        input_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    stop_ids = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    # a stop string of n characters ends within the last few tokens; decode a generous tail only
    tail = 4 * max((len(s) for s in config.stop_strings), default=0) + 8
    models = [model] if mixture_model is None else [model, mixture_model]
    was_training = [getattr(m, "training", None) for m in models]
    for m in models:
        if isinstance(m, torch.nn.Module):
            m.eval()
    try:
        caches, logits = [], []
        for m in models:  # one static cache per model, the same prompts prefilled once each
            cache = KVCache(m.config, B, P + config.max_new_tokens, device, dtype)
            hidden = m(input_ids, attention_mask=attention_mask, cache=cache, cache_pos=0, hidden_only=True)
            lg = F.linear(hidden[:, -1], m.lm_head_weight).float()  # (B, V): last position only
            if num_samples > 1:
                cache = cache.repeat_interleave(num_samples)
                lg = lg.repeat_interleave(num_samples, dim=0)
            caches.append(cache)
            logits.append(lg)
        finished = torch.zeros(N, dtype=torch.bool, device=device)
        tokens, logprobs, masks = [], [], []
        texts_ids = [[] for _ in range(N)]  # completions on the host, only kept for stop strings
        for step in range(config.max_new_tokens):
            mixed = logits[0] if mixture_model is None else mixture_logits(logits[0], logits[1], mixture_coef)
            tok, lp = sample_next(mixed, config, generator)
            alive = ~finished
            tok = tok.masked_fill(finished, pad_id)
            tokens.append(tok)
            logprobs.append(lp.masked_fill(finished, 0.0))
            masks.append(alive)
            finished = finished | torch.isin(tok, stop_ids)
            if config.stop_strings:
                finished = _check_stop_strings(tok, alive, finished, texts_ids, tokenizer, config.stop_strings, tail)
            # under torchrun every rank must stop together: the sharded model's forward is a collective
            if step == config.max_new_tokens - 1 or distributed.all_true(bool(finished.all())):
                break
            logits = [m(tok[:, None], cache=c, cache_pos=P + step)[:, -1].float() for m, c in zip(models, caches)]
    finally:
        for m, flag in zip(models, was_training):
            if isinstance(m, torch.nn.Module):
                m.train(flag)
    return Rollout(prompt_ids=[list(p) for p in prompts], completion_ids=torch.stack(tokens, 1),
                   logprobs=torch.stack(logprobs, 1).float(), mask=torch.stack(masks, 1).float(),
                   truncated=~finished, stop_strings=config.stop_strings)


def _check_stop_strings(tok, alive, finished, texts_ids, tokenizer, stop_strings, tail):
    """Append this step's tokens of live rows and end rows whose decoded tail now holds a stop string.

    Checked every step, so the first step a stop string appears is the step its last token arrived.
    """
    rows = alive.nonzero().flatten().tolist()
    toks = tok.tolist()
    done = finished.tolist()
    for r in rows:
        texts_ids[r].append(toks[r])
        if not done[r]:
            text = tokenizer.decode(texts_ids[r][-tail:], skip_special_tokens=True)
            done[r] = any(s in text for s in stop_strings)
    return torch.tensor(done, dtype=torch.bool, device=finished.device)
