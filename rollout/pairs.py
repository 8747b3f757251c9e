"""On-policy preference pairs: the model's own samples, judged by a verifier.

Pairs written against some other model's outputs (the shipped file rejects the *base* model's
mistakes) stop teaching anything once the policy no longer makes those mistakes, and DPO then pushes
down answers the policy never gives, which can move its answers past the right value. Pairs built
from the policy's own samples always sit where the policy is unsure.

For each prompt, `samples` completions are drawn from the model at the start of the stage (the
KV-cached sampler, one prefill per prompt) and scored by a registered reward function
(rollout/rewards.py). A completion is right when its reward is at least `threshold`. A prompt with
both right and wrong completions gives up to `pairs_per_prompt` pairs: chosen = its most frequent
right completion, rejected = its distinct wrong completions, most frequent first (the mistakes the
policy makes most). Prompts whose samples all agree give nothing; they are counted.

This is rejection-sampling pair construction as in RS-DPO (Khaki et al., 2024,
arXiv:2402.10038) and online/iterative DPO (Xiong et al., 2024, arXiv:2312.11456; Llama 3 builds
each round's pairs from the latest model). Used by train.py when a pairs method has
`method.on_policy` set; the pairs are written to the run directory as preference JSONL.
"""
from __future__ import annotations

from collections import Counter

import torch
from tqdm import tqdm

from data.formats import tokenize_prompt
from rollout.sampler import SamplingConfig, generate


@torch.no_grad()
def sample_pairs(model, tok, rows: list[dict], reward_fn, samples: int = 8, sampling: SamplingConfig | None = None,
                 seed: int = 0, pairs_per_prompt: int = 1, threshold: float = 1.0, batch_prompts: int = 64,
                 progress: bool = False) -> tuple[list[dict], dict]:
    """Preference rows {prompt, chosen, rejected, answer, task: "on_policy"} from `model`'s samples.

    `rows` are prompt records (a `prompt` plus the columns `reward_fn` reads, e.g. `answer`).
    Returns the pairs and statistics: prompts, pairs, sample_accuracy (share of right samples) and
    the shares of prompts whose samples were all right / all wrong.
    """
    if samples < 2:
        raise ValueError(f"on-policy pairs need at least 2 samples per prompt to compare, got samples={samples}")
    if not rows:
        raise ValueError("on-policy pairs: no prompts")
    sampling = sampling or SamplingConfig()
    pairs, right_total, all_right, all_wrong = [], 0, 0, 0
    chunks = range(0, len(rows), batch_prompts)
    for k, i in enumerate(tqdm(chunks, desc="on-policy pairs", disable=not progress)):
        chunk = rows[i:i + batch_prompts]
        ids = [tokenize_prompt(r["prompt"], tok) for r in chunk]
        roll = generate(model, ids, sampling, tok.stop_token_ids, tok.pad_token_id, num_samples=samples,
                        seed=seed + k, tokenizer=tok)
        texts = roll.texts(tok)
        fields = {c: [r.get(c) for r in chunk for _ in range(samples)] for c in chunk[0] if c != "prompt"}
        scores = reward_fn([r["prompt"] for r in chunk for _ in range(samples)], texts, **fields)
        for j, r in enumerate(chunk):
            group = list(zip(texts[j * samples:(j + 1) * samples], scores[j * samples:(j + 1) * samples]))
            right = Counter(t for t, s in group if s >= threshold)
            wrong = Counter(t for t, s in group if s < threshold and t not in right)
            right_total += sum(right.values())
            all_right += not wrong
            all_wrong += not right
            if right and wrong:
                chosen = right.most_common(1)[0][0]
                for rejected, _ in wrong.most_common(pairs_per_prompt):
                    pairs.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected,
                                  **({"answer": r["answer"]} if "answer" in r else {}), "task": "on_policy"})
    n = len(rows)
    stats = {"prompts": n, "pairs": len(pairs), "sample_accuracy": round(right_total / (n * samples), 4),
             "all_right": round(all_right / n, 4), "all_wrong": round(all_wrong / n, 4)}
    return pairs, stats
