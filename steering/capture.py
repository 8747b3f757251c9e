"""Residual-stream activations, captured with forward hooks on the decoder layers.

The residual stream after layer i is the output of `model.model.layers[i]` (the transformer's
layers return `x + attn + mlp`), so a forward hook on that module sees exactly what the next layer
reads. Nothing in the model is edited or subclassed: hooks are registered for one forward pass and
always removed (try/finally), so a capture leaves the model as it found it.

Prompts are rendered with the chat template and the assistant generation prompt (what the model
sees right before it answers) and LEFT-padded, so position -1 is the last prompt token of every
row and -k is the k-th from the end whatever the prompt's length. Positions are either
  * a list of negative offsets (default [-1]): in a chat template the last tokens are the
    post-instruction tokens (`<|im_end|>\\n<|im_start|>assistant\\n`), where Arditi et al. (2024)
    look for the refusal direction; offsets must fit in the shortest prompt (a clear error otherwise);
  * "instruction": the mean over the tokens of the user's text itself (the chat template's own
    tokens excluded; found from the tokenizer's character offsets). On the embedded 4-layer model
    this is where refusal lives: the last layer reads the topic tokens directly, so the direction
    at the post-instruction tokens is mostly the "I" vs "Sure" output direction (see
    configs/method/abliterate.yaml for the measured numbers).

Activations come back in fp32 on the CPU as one tensor (layers, prompts, positions, hidden):
small (4 x 128 x 1 x 128 for the embedded model) and what the direction code needs.
"""
from __future__ import annotations

import torch

from data.formats import read_jsonl, tokenize_prompt


def num_layers(model) -> int:
    return len(model.model.layers)


def check_layers(model, layers) -> list[int]:
    """`layers` (None = all, an int, or a list of ints) as a sorted list; a clear error when out of range."""
    n = num_layers(model)
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers: expected at least one layer index (or null for all layers), got an empty list")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"layer {i!r}: expected an integer layer index in 0..{n - 1}")
        if not 0 <= i < n:
            raise ValueError(f"layer {i} is out of range: the model has {n} layers (indices 0..{n - 1})")
    return sorted(set(layers))


INSTRUCTION = "instruction"


def check_positions(positions):
    """Negative offsets from the end of the prompt (-1 = last prompt token), or "instruction"."""
    if positions is None:
        return [-1]
    if isinstance(positions, str):
        if positions != INSTRUCTION:
            raise ValueError(f"positions {positions!r}: expected a list of negative offsets (e.g. [-1]) "
                             f"or {INSTRUCTION!r} (the mean over the prompt text's own tokens)")
        return positions
    if isinstance(positions, int):
        positions = [positions]
    positions = list(positions)
    if not positions:
        raise ValueError("positions: expected at least one negative offset such as -1 (the last prompt token)")
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or p >= 0:
            raise ValueError(f"position {p!r}: expected a negative offset from the end of the prompt "
                             f"(-1 = last prompt token, -2 = the one before ...)")
    return positions


def load_prompts(path: str, max_prompts: int | None = None) -> list[str]:
    """The `prompt` field of every line of a JSONL file (validated whole; an empty file is a DataError)."""
    prompts = [r["prompt"] for r in read_jsonl(path, "prompt")]
    return prompts[:max_prompts] if max_prompts else prompts


def encode_prompts(tok, prompts: list[str], chat: bool = True) -> list[list[int]]:
    """Token ids of each prompt: chat template + generation prompt (chat=True), or the raw text."""
    if not prompts:
        raise ValueError("empty prompt set: expected at least one prompt to capture activations from")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"prompt {bad[0]}: expected a non-empty string, got {prompts[bad[0]]!r}")
    return [tokenize_prompt(p, tok) if chat else tok.encode(p) for p in prompts]


def instruction_mask(tok, prompt: str, ids: list[int], chat: bool = True) -> list[bool]:
    """True on the tokens of `ids` that hold the prompt's own text (not the chat template's tokens)."""
    if not chat:
        return [True] * len(ids)
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    enc = tok.backend.encode(rendered, add_special_tokens=False)
    start = rendered.rfind(prompt)
    if enc.ids != ids or start < 0:
        raise ValueError("positions='instruction' needs the chat template to contain the prompt text verbatim "
                         "and to tokenize the same way as a whole; use negative offsets instead")
    end = start + len(prompt)
    return [a < end and b > start for a, b in enc.offsets]


def left_pad(ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), every row ending at the last column."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return input_ids.to(device), mask.to(device)


@torch.no_grad()
def capture(model, tok, prompts: list[str], layers=None, positions=(-1,), batch_size: int = 32,
            chat: bool = True) -> torch.Tensor:
    """Residual-stream activations after each layer in `layers` at `positions` of each prompt.

    Returns fp32 CPU (len(layers), len(prompts), len(positions), hidden_size), layers in sorted order;
    with positions="instruction" the positions axis has size 1 (the mean over the prompt text's tokens).
    """
    layers = check_layers(model, layers)
    positions = check_positions(positions)
    ids = encode_prompts(tok, prompts, chat)
    shortest = min(len(x) for x in ids)
    if positions != INSTRUCTION and -min(positions) > shortest:
        raise ValueError(f"position {min(positions)} is before the start of the shortest prompt "
                         f"({shortest} tokens): use offsets in -{shortest}..-1")
    device = model.model.embed_tokens.weight.device
    select = None
    if positions == INSTRUCTION:
        masks = [instruction_mask(tok, p, x, chat) for p, x in zip(prompts, ids)]
    else:
        pos = torch.tensor(positions, device=device)
    out = {i: [] for i in layers}
    current = {}

    def hook_for(i):
        def hook(module, args, output):
            if select is None:
                current[i] = output[:, pos].float().cpu()
            else:  # mean over the selected tokens of each row
                w = select[..., None].to(output.dtype)
                current[i] = ((output * w).sum(1) / w.sum(1))[:, None].float().cpu()
        return hook

    handles = [model.model.layers[i].register_forward_hook(hook_for(i)) for i in layers]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(ids), batch_size):
            input_ids, mask = left_pad(ids[start:start + batch_size], tok.pad_token_id, device)
            if positions == INSTRUCTION:
                rows = [[False] * (input_ids.shape[1] - len(m)) + m for m in masks[start:start + batch_size]]
                select = torch.tensor(rows, device=device)
            current.clear()
            model(input_ids, attention_mask=mask, hidden_only=True)
            for i in layers:
                out[i].append(current[i])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.stack([torch.cat(out[i]) for i in layers])
