"""The transformer: Llama 3.x, Qwen2/2.5 and Qwen3 in one readable file.

Parameter names are exactly the Hugging Face names (`model.layers.0.self_attn.q_proj.weight`,
`model.norm.weight`, `lm_head.weight`), so a checkpoint loads with `load_state_dict(strict=True)`
and no conversion table. The three families differ in three switches read from config.json:
q/k/v bias (Qwen2), RMSNorm on q and k per head (Qwen3), and the RoPE frequency rule (Llama 3's
`llama3` scaling). RoPE uses HF's `rotate_half` convention and is computed in fp32 as HF does.

Attention is `scaled_dot_product_attention`. Without a cache and without a mask the causal
kernel runs; that is the training path: batches are right-padded, so a real token never sees a
pad, and pads are excluded from the loss by `loss_mask`. A boolean mask is built only when the
caller passes `attention_mask` (left-padded prompts, as the sampler uses) or a KV cache.

The KV cache (gpt-fast style) is preallocated for `max_len` slots; slot t holds the same step for
every row, so left-padded prompts of different lengths share one prefill, and `cache_mask`
records which slots hold real tokens. `KVCache.repeat_interleave(G)` turns one prefill per prompt
into G samples per prompt without recomputing it.

Sliding-window layers (Qwen2/Qwen3 with `use_sliding_window: true`, per `layer_types` or from
`max_window_layers` on, as transformers 5 reads them) see only the last `sliding_window` keys,
themselves included: one banded copy of the step's mask serves every such layer, on the causal,
left-padded, KV-cache and packed-document paths alike. Slots and positions differ only by each
row's left padding, so a band over slots is the band over positions transformers applies. The
cache keeps every slot (no rolling buffer): memory as for full attention, results as windowed.

`forward(..., hidden_only=True)` returns the final hidden states instead of logits: training
code gathers token log-probs from them in chunks (losses/common.py) so the batch x length x vocab
fp32 logits are never materialised.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's piecewise rescaling when `rope_scaling` asks for it."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope_scaling type '{kind}' is not supported (default, linear, llama3 are)")


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos/sin: (B, T, D)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class KVCache:
    """Preallocated keys/values for every layer: (B, n_kv_heads, max_len, head_dim) each."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # slot holds a real token
        self.max_len = max_len

    def update(self, layer: int, pos: int, k, v):
        """Write k, v at slots [pos, pos + T) and return everything written so far."""
        end = pos + k.shape[2]
        self.k[layer][:, :, pos:end] = k
        self.v[layer][:, :, pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def index_select(self, index: torch.Tensor) -> "KVCache":
        """A cache whose row i is this cache's row index[i] (differentiable: training forwards that
        share one prompt prefill among its samples, rollout/rl.py)."""
        new = object.__new__(KVCache)
        new.k = [t.index_select(0, index) for t in self.k]
        new.v = [t.index_select(0, index) for t in self.v]
        new.mask = self.mask.index_select(0, index)
        new.max_len = self.max_len
        return new

    def repeat_interleave(self, n: int) -> "KVCache":
        """Each row repeated n times (row i -> rows i*n .. i*n+n-1): one prefill shared by n samples."""
        new = object.__new__(KVCache)
        new.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        new.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        new.mask = self.mask.repeat_interleave(n, dim=0)
        new.max_len = self.max_len
        return new


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, cache_pos: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, cache_pos, k, v)
        # GQA without copying keys/values per head (torch >= 2.5)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.gradient_checkpointing = False
        self.sliding = [t == "sliding_attention" for t in config.layer_types]  # per layer

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection; the embedding matrix when embeddings are tied (no `lm_head.weight` key)."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def reset_rope(self, device=None):
        """Recompute the non-persistent RoPE buffer (after building on the meta device)."""
        device = device or self.model.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.config).to(device)

    def rope(self, position_ids, dtype):
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, D/2), fp32 as HF
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                cache_pos: int = 0, hidden_only: bool = False, document_ids=None):
        """Logits (B, T, V) for `input_ids` (B, T); final hidden states (B, T, H) with `hidden_only`.

        attention_mask: (B, T) 1 on real tokens. Needed only for left padding; right-padded
            training batches run the causal kernel without it.
        position_ids: (B, T); default: count of real tokens before each one (0 for the first real token).
        cache, cache_pos: write this step's keys/values at slots [cache_pos, cache_pos + T).
        document_ids: (B, T) for packed rows (several examples in one row, no padding between them):
            a token attends only to earlier tokens of its own document, and positions restart at 0
            for each document, so every example computes exactly what it would alone.
        """
        B, T = input_ids.shape
        mask = None
        if cache is not None:
            real = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None \
                else attention_mask[:, -T:].bool()
            cache.mask[:, cache_pos:cache_pos + T] = real
            keys = cache.mask[:, :cache_pos + T]
            if position_ids is None:
                position_ids = keys.long().cumsum(-1)[:, -T:] - 1
            mask = _causal_mask(keys, T, cache_pos)
        elif document_ids is not None:
            mask = _document_mask(document_ids)
            if position_ids is None:
                position_ids = _document_positions(document_ids)
        elif attention_mask is not None:
            keys = attention_mask.bool()
            if position_ids is None:
                position_ids = attention_mask.long().cumsum(-1) - 1
            mask = _causal_mask(keys, T, 0)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        position_ids = position_ids.clamp(min=0)
        window = self.config.sliding_window
        offset = cache_pos if cache is not None else 0
        banded = mask
        if window is not None and any(self.sliding) and offset + T > window:  # else the band hides nothing
            banded = _band(mask, T, offset, window, input_ids.device)

        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        for layer, sliding in zip(self.model.layers, self.sliding):
            m = banded if sliding else mask
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, m, cache, cache_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, m, cache, cache_pos)
        x = self.model.norm(x)
        if hidden_only:
            return x
        return F.linear(x, self.lm_head_weight)


def _band(mask, T: int, offset: int, window: int, device) -> torch.Tensor:
    """`mask` (None: plain causal) restricted to the last `window` key slots of each query (itself included),
    transformers' sliding_window_overlay: key slot k is seen from query slot q only if k > q - window."""
    q_slot = torch.arange(offset, offset + T, device=device)[:, None]
    k_slot = torch.arange(offset + T, device=device)[None, :]
    band = k_slot > q_slot - window
    if mask is None:
        return (band & (k_slot <= q_slot))[None, None]
    return mask & band


def _document_mask(doc: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: causal attention inside each document of a packed row (block diagonal)."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def _document_positions(doc: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document (documents are contiguous runs of one id)."""
    idx = torch.arange(doc.shape[1], device=doc.device).expand_as(doc)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values


def _causal_mask(keys: torch.Tensor, T: int, offset: int) -> torch.Tensor:
    """(B, 1, T, S) boolean: query i (at slot offset+i) sees real key slots <= offset+i, and always itself
    (so a pad query's row is never empty, which would give NaN)."""
    S = keys.shape[1]
    q_slot = torch.arange(offset, offset + T, device=keys.device)[:, None]
    k_slot = torch.arange(S, device=keys.device)[None, :]
    causal = k_slot <= q_slot
    mask = causal[None] & keys[:, None, :]
    mask = mask | (k_slot == q_slot)[None]
    return mask[:, None]
