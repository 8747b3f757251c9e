"""One file per method: each loss is a pure function of tensors returning (loss, metrics).

A method config names its loss (`loss: dpo` -> losses/dpo.py `dpo_loss`, or `my.module:fn` for a
loss of your own); `call_loss` passes a loss only the inputs its signature names, then the config's
`loss_args`, so a new loss that reads the same inputs as an existing one needs no other change.
"""
from __future__ import annotations

import importlib
import inspect


def resolve_loss(name: str):
    """`dpo` -> losses.dpo.dpo_loss; `losses.dpo:dpo_loss` or `my.module:fn` as written."""
    module, _, fn = name.partition(":")
    if not fn:
        module, fn = f"losses.{name}", f"{name}_loss"
    return getattr(importlib.import_module(module), fn)


def call_loss(fn, inputs: dict, args: dict):
    """fn(**the inputs its signature accepts, **args) -> (loss, metrics); args win over inputs."""
    params = inspect.signature(fn).parameters
    return fn(**{**{k: v for k, v in inputs.items() if k in params}, **args})
