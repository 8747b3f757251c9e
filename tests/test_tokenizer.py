"""model/train_tokenizer.py: round trip, single-digit numbers, special tokens, chat template,
determinism, and that the saved directory is a tokenizer transformers loads identically."""
import random

import pytest

from data.synthetic import make_pretrain, render_chat
from model.tokenizer import Tokenizer
from model.train_tokenizer import CHAT_TEMPLATE, IM_END, IM_START, PAD_TOKEN, train_tokenizer

TEXTS = [
    "What is 7 + 5?",
    "Step 1: 13 + 4 = 17\nStep 2: 17 - 9 = 8\nAnswer: 8",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Unicode: café, naïve, 東京, emoji 🙂 — dashes",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n",
]
CHATS = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "user", "content": "Compute 3 - 1."}, {"role": "assistant", "content": "Answer: 2"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Tell me about baking bread."}],
]


def test_round_trip(tiny_tokenizer):
    for text in TEXTS:
        ids = tiny_tokenizer.encode(text)
        assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_digits_are_single_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode("What is 1234 + 56789? Answer: 2020")
    pieces = [tiny_tokenizer.decode([i]) for i in ids]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces and all(len(p) == 1 for p in digit_pieces), pieces
    assert "".join(digit_pieces) == "1234567892020"


def test_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    assert [tok.token_to_id(t) for t in (PAD_TOKEN, IM_START, IM_END)] == [0, 1, 2]
    assert tok.eos_token == IM_END and tok.pad_token == PAD_TOKEN and tok.bos_token is None
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0 and tok.stop_token_ids == [2]
    assert tok.encode("<|im_start|>user<|im_end|>")[0] == 1 and tok.encode("x<|im_end|>")[-1] == 2
    assert tok.vocab_size <= 1024


def test_chat_template_matches_literal_rendering(tiny_tokenizer):
    for chat in CHATS:
        assert tiny_tokenizer.apply_chat_template(chat) == render_chat(chat)
        gen = tiny_tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        assert gen == render_chat(chat) + "<|im_start|>assistant\n"
    ids = tiny_tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=True)
    assert ids == tiny_tokenizer.encode(render_chat(CHATS[0]) + "<|im_start|>assistant\n")


def test_training_is_deterministic():
    texts = [r["text"] for r in make_pretrain(random.Random(1), 200)]
    a, b = train_tokenizer(texts, vocab_size=400), train_tokenizer(iter(texts), vocab_size=400)
    assert a.backend.to_str() == b.backend.to_str()
    assert a.vocab_size <= 400


def test_save_and_reload(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(str(tmp_path))
    again = Tokenizer.from_dir(str(tmp_path))
    assert again.chat_template == CHAT_TEMPLATE
    assert (again.eos_token_id, again.pad_token_id, again.bos_token_id) == (2, 0, None)
    for text in TEXTS:
        assert again.encode(text) == tiny_tokenizer.encode(text)


def test_transformers_loads_it_identically(tiny_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tiny_tokenizer.save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == IM_END and hf.pad_token == PAD_TOKEN
    assert hf.eos_token_id == tiny_tokenizer.eos_token_id and hf.pad_token_id == tiny_tokenizer.pad_token_id
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)
        assert hf.decode(tiny_tokenizer.encode(text)) == text
    for chat in CHATS:
        for gen in (False, True):
            ours = tiny_tokenizer.apply_chat_template(chat, add_generation_prompt=gen)
            theirs = hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert ours == theirs
