"""Activation steering and abliteration on the residual stream.

  capture.py     residual activations after chosen layers, at chosen token positions (forward hooks)
  directions.py  difference of means / PCA of paired differences, candidate table, layer selection
  hooks.py       runtime steering (add_vector, Steerer) and direction ablation (ablate_direction)
  abliterate.py  orthogonalise embed_tokens, o_proj, down_proj against a direction (weights, no hooks)
  vectors.py     SteeringVector: safetensors files with layer and model metadata
  pairs.py       the shipped style-cue prompt pairs (data/synthetic/style_{cue,plain}_train.jsonl)
  run.py         run_steer / run_abliterate: what `python train.py method=steer|abliterate` runs
"""
