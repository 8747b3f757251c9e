"""The forward passes that turn token sequences into per-token log-probs for the losses.

Two layouts, one per family of kinds:
  * dataset kinds (tokens, pairs, unpaired): tokenized examples with a `loss_mask`; `sequence_logps`
    returns (B, T-1) log-probs where position t scores token t+1, and the mask shifted the same way.
    Padding-free by default for pairs: the sequences run packed into a few rows (document attention,
    model/transformer.py) and are unpacked to the padded layout: same values, fewer tokens.
  * rollout kinds: prompt + completion ids; `completion_logprobs` returns (N, width) log-probs of
    the completion tokens only, column j = completion token j (the sampler's layout).
    `shared_prompt_logprobs` computes the same values with each prompt prefilled once for its G
    samples (a differentiable KV cache), which is most of a GRPO batch's tokens.
Log-probs are always gathered in chunks (losses/common.py): the B x T x V logits never exist.
"""
from __future__ import annotations

import torch

from data.formats import collate, pack_examples
from losses.common import sequence_logprobs, token_logprobs

PACK_ROW = 64  # padding-free rows hold up to max(PACK_ROW, longest sequence) tokens


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def sequence_logps(model, seqs: list[dict], tok, device, padding_free: bool = False):
    """Per-token log-probs (B, T-1), the shifted loss mask, and the number of real tokens run."""
    if not padding_free or "document_ids" in seqs[0]:
        b = to_device(collate(seqs, tok.pad_token_id), device)
        logp, mask = sequence_logprobs(model, b["input_ids"], b["loss_mask"], document_ids=b.get("document_ids"))
        return logp, mask, int(b["attention_mask"].sum())
    width = max(len(s["input_ids"]) for s in seqs)
    rows = pack_examples(seqs, max(width, PACK_ROW))
    b = to_device(collate(rows, tok.pad_token_id), device)
    row_logp, _ = sequence_logprobs(model, b["input_ids"], b["loss_mask"], document_ids=b["document_ids"])
    r_idx, src, dst_i, dst_j, i = [], [], [], [], 0  # row r position start+j scores token j+1 of sequence i
    for r, row in enumerate(rows):
        start = 0
        for n in torch.unique_consecutive(torch.tensor(row["document_ids"]), return_counts=True)[1].tolist():
            r_idx += [r] * (n - 1)
            src += range(start, start + n - 1)
            dst_i += [i] * (n - 1)
            dst_j += range(n - 1)
            start, i = start + n, i + 1
    picked = row_logp[torch.tensor(r_idx, device=device), torch.tensor(src, device=device)]
    logp = row_logp.new_zeros(len(seqs), width - 1).index_put(
        (torch.tensor(dst_i, device=device), torch.tensor(dst_j, device=device)), picked)
    mask = collate(seqs, tok.pad_token_id)["loss_mask"][:, 1:].to(device=device, dtype=logp.dtype)
    return logp, mask, sum(len(s["input_ids"]) for s in seqs)


def reference_logps(ref, seqs: list[dict], tok, device, padding_free: bool = False):
    """Reference per-token log-probs: the ones stored in the examples (`ref_logps`), else a no-grad forward."""
    if all("ref_logps" in s for s in seqs):
        width = max(len(s["input_ids"]) for s in seqs) - 1
        out = torch.zeros(len(seqs), width, device=device)
        for i, s in enumerate(seqs):
            out[i, :len(s["ref_logps"])] = torch.tensor(s["ref_logps"], device=device)
        return out
    with torch.no_grad():
        return sequence_logps(ref, seqs, tok, device, padding_free)[0]


def completion_logprobs(model, prompt_lens: list[int], seqs: list[list[int]], width: int, pad_id: int,
                        temperature: float = 1.0, with_entropy: bool = False):
    """Log-probs (N, width) of the completion tokens of `seqs` (prompt + completion, unpadded) under `model`.

    Column j is completion token j, matching the sampler's layout; right-padded, causal, no mask needed.
    """
    device = model.model.embed_tokens.weight.device
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, device=device)
    hidden = model(ids, hidden_only=True)
    start = torch.tensor(prompt_lens, device=device)[:, None] - 1  # position t predicts token t+1
    pos = (start + torch.arange(width, device=device)[None]).clamp(max=T - 2)
    h = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
    labels = ids.gather(1, (pos + 1).clamp(max=T - 1))
    return token_logprobs(h, model.lm_head_weight, labels, temperature, with_entropy=with_entropy)


def completion_states(model, prompt_lens: list[int], seqs: list[list[int]], width: int, pad_id: int):
    """Final hidden states (N, width, H) that predict each completion token, and the completion ids
    (N, width), with each prompt run once for all its samples.

    Consecutive rows with the same prompt form a group: the group's prompt is prefilled once
    (left-padded, into a KV cache that keeps the autograd graph), the cache rows are repeated for the
    group's samples, and the completions run on top of it. The prompt's last hidden state predicts
    completion token 0; the prompt's activations get the gradient of every sample of its group. Not
    with gradient checkpointing (recomputing a block would write the cache a second time).
    """
    from model.transformer import KVCache

    device = model.model.embed_tokens.weight.device
    starts = [i for i in range(len(seqs)) if i == 0 or prompt_lens[i] != prompt_lens[i - 1]
              or seqs[i][:prompt_lens[i]] != seqs[i - 1][:prompt_lens[i - 1]]]
    counts = torch.tensor([b - a for a, b in zip(starts, starts[1:] + [len(seqs)])], device=device)
    prompts = [seqs[i][:prompt_lens[i]] for i in starts]
    P = max(len(p) for p in prompts)
    pids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    pmask = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at slot P - 1
        pids[i, P - len(p):] = torch.tensor(p, device=device)
        pmask[i, P - len(p):] = 1
    cache = KVCache(model.config, len(prompts), P + width, device, model.model.embed_tokens.weight.dtype)
    last = model(pids, attention_mask=pmask, cache=cache, cache_pos=0, hidden_only=True)[:, -1]
    rows = torch.repeat_interleave(torch.arange(len(prompts), device=device), counts)
    comp = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    cmask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
        c = s[n:n + width]
        comp[i, :len(c)] = torch.tensor(c, device=device)
        cmask[i, :len(c)] = 1
    hidden = model(comp[:, :-1], attention_mask=cmask[:, :-1], cache=cache.index_select(rows), cache_pos=P,
                   hidden_only=True) if width > 1 else last.new_zeros(len(seqs), 0, last.shape[-1])
    return torch.cat([last[rows][:, None], hidden], 1), comp  # position j predicts completion token j


def shared_prompt_logprobs(model, prompt_lens: list[int], seqs: list[list[int]], width: int, pad_id: int,
                           temperature: float = 1.0, with_entropy: bool = False):
    """`completion_logprobs` with each prompt run once for all its samples (same values, with gradient)."""
    h, comp = completion_states(model, prompt_lens, seqs, width, pad_id)
    return token_logprobs(h, model.lm_head_weight, comp, temperature, with_entropy=with_entropy)


def policy_logprobs(model, prompt_lens, seqs, width, pad_id, temperature=1.0, with_entropy=False):
    """Completion log-probs of a rollout micro-batch: one prompt prefill per group, except under
    gradient checkpointing (a plain padded forward there, see shared_prompt_logprobs)."""
    fn = completion_logprobs if getattr(model, "gradient_checkpointing", False) else shared_prompt_logprobs
    return fn(model, prompt_lens, seqs, width, pad_id, temperature, with_entropy=with_entropy)
