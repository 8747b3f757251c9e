"""The shipped contrastive prompt files for style steering (data/synthetic/style_{cue,plain}_train.jsonl).

Steering toward the second answer style needs two prompt sets that differ only in the style cue:
line i of `style_cue_train.jsonl` is line i of `style_plain_train.jsonl` with STYLE_CUE appended
(so the pairs also suit direction="pca"). The prompts are drawn like style_eval's (half arithmetic,
half harmless topics) but from the TRAIN side of the synthetic world (train triples, train topic
templates), so the held-out style_eval set never feeds the vector.

    python -m steering.pairs            # rewrites the two files (deterministic)
"""
from __future__ import annotations

import json
import os
import random

from data import synthetic as S
from tasks.style import STYLE_CUE

N_PAIRS = 128


def style_pairs(n: int = N_PAIRS, seed: int = S.SEED) -> list[tuple[str, str]]:
    """(prompt with cue, prompt without cue) pairs from the train side of the synthetic world."""
    rng = random.Random(f"{seed}/style_pairs")
    pools = S._pools()
    plain = [S._arith_record(item)[0] for item in S._arith_items(rng, pools, "train", n // 2)]
    plain += [tpl.format(x=x) for x, tpl in S.draw(rng, pools["harmless_train"], n - n // 2)]
    rng.shuffle(plain)
    return [(p + STYLE_CUE, p) for p in plain]


def write_style_pairs(out_dir: str = "data/synthetic", n: int = N_PAIRS) -> tuple[str, str]:
    pairs = style_pairs(n)
    paths = (os.path.join(out_dir, "style_cue_train.jsonl"), os.path.join(out_dir, "style_plain_train.jsonl"))
    for path, k in zip(paths, (0, 1)):
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for pair in pairs:
                f.write(json.dumps({"prompt": pair[k]}, ensure_ascii=False) + "\n")
    return paths


if __name__ == "__main__":
    for p in write_style_pairs():
        print(p)
