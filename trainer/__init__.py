"""The training side every method shares.

    config.py       typed options of every group and kind; Hydra bases `_<kind>`; checks before loading
    feeds/          one feed per batch kind: the loop's only view of a method's data (registry)
    forward.py      the forward passes that turn sequences into per-token log-probs
    loop.py         the optimisation loop: AdamW, schedule, accumulation, guards, metrics.jsonl
    run.py          the train program: config -> model -> feed -> loop -> eval -> save
    models.py       model setup: load or build, adapters, the reference policy, the final save
    checkpoint.py   crash-safe checkpoints and exact resume (safetensors + JSON, no pickle)
    distributed.py  FSDP2 under torchrun; rank-0 logging
    pipeline.py     staged runs gated by held-out evaluation
    paths.py        how relative config paths resolve
"""
