"""LoRA and DoRA wrappers around a frozen linear layer (an nn.Linear or an NF4Linear: QLoRA).

The wrapper holds the base layer as `base_layer` and the adapter as `lora_A`, `lora_B` (and DoRA's
`lora_magnitude_vector`), so inside the model the keys read `...q_proj.base_layer.weight`,
`...q_proj.lora_A.weight`: PEFT's names without the adapter name `.default`. The on-disk format
(peft_io.py) only adds PEFT's `base_model.model.` prefix. `weight` and `bias` are forwarded to the
base layer so code that reads `q_proj.weight` keeps working.

LoRA (Hu et al. 2021):    y = W x + b + s * B A dropout(x),        s = alpha / r  (rsLoRA: alpha / sqrt(r))
DoRA (Liu et al. 2024):   y = m / ||W + s B A||_row * (W x + s B A x) + b
  m has one value per output feature, initialised to ||W||_row, so a fresh adapter equals the base;
  the row norm is computed without gradient (paper §4.3: treated as a constant in backward).
  With dropout active, DoRA follows PEFT: y = W x + b + (m/n - 1) W x_d + (m/n) s B A x_d.
A is Kaiming-uniform (a = sqrt(5), nn.Linear's and PEFT's default), B is zero: a fresh adapter
changes nothing. Adapter parameters are created in fp32 on the base's device (PEFT's
autocast_adapter_dtype default); the adapter path runs in their dtype and is cast back to the input's.

`merge()` stores the merged dense weight beside the untouched base and `unmerge()` drops it, so
unmerge is exact (no W + dW - dW rounding) and an NF4 base can be merged too; the price is one dense
copy of the layer while merged. `disabled = True` makes the layer compute the base alone: the
reference model of DPO/KTO/GRPO without a second copy of the weights (see inject.adapters_disabled).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora.nf4 import NF4Linear, nf4_linear


def base_weight(base: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight of an nn.Linear or (dequantised) NF4Linear, detached."""
    if isinstance(base, NF4Linear):
        return base.dequantized_weight(dtype)
    w = base.weight.detach()
    return w if dtype is None else w.to(dtype)


def base_dtype(base: nn.Module) -> torch.dtype:
    return base.weight_dtype if isinstance(base, NF4Linear) else base.weight.dtype


class LoRALinear(nn.Module):
    """y = base(x) + s * lora_B(lora_A(dropout(x)))."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear or NF4Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        device = base.codes.device if isinstance(base, NF4Linear) else base.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        for p in base.parameters():
            p.requires_grad_(False)
        self.disabled = False
        self.merged_weight: torch.Tensor | None = None

    # ---------------------------------------------------------------- the base, under the HF name
    @property
    def weight(self) -> torch.Tensor:
        """The base weight (the Parameter itself; for an NF4 base a freshly dequantised dense copy)."""
        return base_weight(self.base_layer) if isinstance(self.base_layer, NF4Linear) else self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return self.merged_weight is not None

    # ---------------------------------------------------------------- forward
    def _base_nobias(self, x):
        if isinstance(self.base_layer, NF4Linear):
            return nf4_linear(x, self.base_layer.nf4)
        return F.linear(x, self.base_layer.weight)

    def _lora(self, x):
        """s * B A x in the adapter dtype, returned in x's dtype."""
        a = self.lora_A.weight
        return (self.lora_B(self.lora_A(x.to(a.dtype))) * self.scaling).to(x.dtype)

    def forward(self, x):
        if self.disabled:
            return self.base_layer(x)
        if self.merged:
            return F.linear(x, self.merged_weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self.base_layer(x) + self._lora(self.lora_dropout(x))

    # ---------------------------------------------------------------- merging
    def delta_weight(self) -> torch.Tensor:
        """s * B A in fp32 (no gradient)."""
        with torch.no_grad():
            return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_dense_weight(self) -> torch.Tensor:
        """The dense weight that computes what this layer computes, in the base's dtype."""
        with torch.no_grad():
            return (base_weight(self.base_layer, torch.float32) + self.delta_weight()).to(base_dtype(self.base_layer))

    def merge(self):
        if not self.merged:
            self.merged_weight = self.merged_dense_weight()

    def unmerge(self):
        self.merged_weight = None

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.use_rslora}"


class DoRALinear(LoRALinear):
    """y = m / ||W + s B A||_row * (W x + s B A x) + b, the norm detached."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__(base, rank, alpha, dropout, use_rslora, adapter_dtype)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, fp32, no gradient (the paper's detached norm)."""
        with torch.no_grad():
            return torch.linalg.vector_norm(base_weight(self.base_layer, torch.float32) + self.delta_weight(), dim=1)

    def forward(self, x):
        if self.disabled:
            return self.base_layer(x)
        if self.merged:
            return super().forward(x)
        scale = (self.lora_magnitude_vector / self.weight_norm()).to(x.dtype)  # gradient reaches m only
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            y = scale * (self._base_nobias(x) + self._lora(x))
            return y if bias is None else y + bias
        xd = self.lora_dropout(x)  # PEFT's form under dropout
        return self.base_layer(x) + (scale - 1) * self._base_nobias(xd) + scale * self._lora(xd)

    def merged_dense_weight(self) -> torch.Tensor:
        with torch.no_grad():
            w = base_weight(self.base_layer, torch.float32) + self.delta_weight()
            m = self.lora_magnitude_vector.detach().float()
            return (w * (m / torch.linalg.vector_norm(w, dim=1))[:, None]).to(base_dtype(self.base_layer))
