"""Steering vectors and directions as safetensors files with their metadata.

A `SteeringVector` is one vector per layer it applies at (layer -> (hidden,) fp32) plus the
coefficient it was tuned with and the model it came from. It is stored as one safetensors file:
tensors `layer.{i}` and string metadata (safetensors metadata is str -> str):

    layers        "[2]"           the layers, JSON
    hidden_size   "128"           width of the model the vectors were taken from
    num_layers    "4"
    model_type    "qwen3"
    coefficient   "4.0"           what runtime steering multiplies the vector by
    kind          "steer" | "direction"   (direction: a unit vector for ablation / abliteration)
    apply_to      "prompt" | "all"        which positions runtime steering adds it at (steering/hooks.py)
    info          "{...}"         JSON: how it was made (positions, prompt files, method ...)

Loading never guesses: a file without the metadata, or a vector whose width differs from the
model it is applied to, is a clear error (`check`), so a vector from another model can never be
silently broadcast into the residual stream.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REQUIRED = ("layers", "hidden_size", "num_layers", "model_type", "coefficient", "kind")


@dataclass
class SteeringVector:
    vectors: dict[int, torch.Tensor]          # layer -> (hidden_size,) fp32
    hidden_size: int
    num_layers: int
    model_type: str
    coefficient: float = 1.0
    kind: str = "steer"                       # "steer" | "direction"
    apply_to: str = "all"                     # "all" | "prompt": where runtime steering adds it
    info: dict = field(default_factory=dict)  # how it was made (JSON-serialisable)

    @classmethod
    def for_model(cls, model, vectors: dict[int, torch.Tensor], **kw) -> "SteeringVector":
        c = model.config
        sv = cls({int(i): v.detach().float().cpu().reshape(-1) for i, v in vectors.items()},
                 hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, model_type=c.model_type, **kw)
        sv.check(model)
        return sv

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def check(self, model) -> None:
        """A clear error unless these vectors fit `model` (width and layer indices)."""
        c = model.config
        for i, v in self.vectors.items():
            if v.dim() != 1 or v.numel() != c.hidden_size:
                raise ValueError(f"steering vector for layer {i} has shape {tuple(v.shape)} (made for a "
                                 f"{self.model_type} model with hidden_size {self.hidden_size}), but this "
                                 f"{c.model_type} model's hidden_size is {c.hidden_size}")
            if not 0 <= i < c.num_hidden_layers:
                raise ValueError(f"steering vector layer {i} is out of range: the model has "
                                 f"{c.num_hidden_layers} layers (indices 0..{c.num_hidden_layers - 1})")
        if self.hidden_size != c.hidden_size:
            raise ValueError(f"steering vector was made for hidden_size {self.hidden_size}, "
                             f"this model's hidden_size is {c.hidden_size}")

    def save(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tensors = {f"layer.{i}": v.detach().float().cpu().contiguous() for i, v in self.vectors.items()}
        meta = {"layers": json.dumps(self.layers), "hidden_size": str(self.hidden_size),
                "num_layers": str(self.num_layers), "model_type": self.model_type,
                "coefficient": repr(float(self.coefficient)), "kind": self.kind,
                "apply_to": self.apply_to, "info": json.dumps(self.info)}
        save_file(tensors, path, metadata=meta)
        return path

    @classmethod
    def load(cls, path: str, model=None) -> "SteeringVector":
        """Read a file written by `save`; with `model`, also check that it fits that model."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: steering vector file not found")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            missing = [k for k in REQUIRED if k not in meta]
            if missing:
                raise ValueError(f"{path}: not a steering vector file: metadata lacks {missing} "
                                 f"(expected {list(REQUIRED)})")
            layers = json.loads(meta["layers"])
            keys = set(f.keys())
            absent = [f"layer.{i}" for i in layers if f"layer.{i}" not in keys]
            if absent:
                raise ValueError(f"{path}: metadata lists layers {layers} but tensors {absent} are missing")
            vectors = {int(i): f.get_tensor(f"layer.{i}") for i in layers}
        sv = cls(vectors, hidden_size=int(meta["hidden_size"]), num_layers=int(meta["num_layers"]),
                 model_type=meta["model_type"], coefficient=float(meta["coefficient"]), kind=meta["kind"],
                 apply_to=meta.get("apply_to", "all"), info=json.loads(meta.get("info") or "{}"))
        if model is not None:
            sv.check(model)
        return sv
