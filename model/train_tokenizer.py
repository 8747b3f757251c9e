"""Train the small byte-level BPE tokenizer of the embedded tiny model.

Built like Qwen's so that everything downstream meets the same kind of tokenizer it meets on a
real checkpoint: NFC normaliser, byte-level pre-tokeniser and decoder (any text encodes, nothing is
ever unknown), the `<|im_start|>`/`<|im_end|>` chat markup as special tokens, `<|endoftext|>` as pad.
One departure: digits are split one by one before the byte-level split, so every number is a
sequence of single-digit tokens and column arithmetic is learnable by a tiny model.

Training is deterministic for the same texts (the `tokenizers` BPE trainer breaks count ties by
the pair itself). The result is a `model.tokenizer.Tokenizer`; `save(dir)` writes a directory that
`transformers.AutoTokenizer.from_pretrained(dir)` also loads, with the same chat template.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from model.tokenizer import Tokenizer

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]   # ids 0, 1, 2

# Qwen-style chat template without an injected system prompt. data/synthetic.render_chat is the same
# rendering in plain Python (tests check that the two agree).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    """Train a byte-level BPE with single-digit pre-tokens on `texts`; returns a chat-ready Tokenizer."""
    backend = _HFTokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    # Registered before training so the markup in the texts is never split into merges.
    backend.add_special_tokens(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    return Tokenizer(backend=backend, chat_template=CHAT_TEMPLATE, eos_token=IM_END, pad_token=PAD_TOKEN,
                     bos_token=None)
