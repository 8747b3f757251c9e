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


# ============================================================================ chat templates vs transformers
# Templates in the style of Qwen2.5 (tools), Qwen3 (reasoning, tools, enable_thinking), Llama 3.1 (bos_token,
# `tools is not none`, date_string), a RAG template (`documents is not none`), a training template with
# {% generation %} blocks, and one that prints the special-token map. Written for these tests: what matters is
# that both renderers get the same string and must produce the same text and ids.
QWEN25_STYLE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\n\n# Tools\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}{{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nReturn a JSON object inside <tool_call></tool_call>.<|im_end|>\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content is defined %}{{- '\n' + message.content }}{%- else %}{{- '\n[no content key]' }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

QWEN3_STYLE = r"""{%- if tools is not none %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- "# Tools\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
                {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
                {{- '<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""

LLAMA31_STYLE = r"""{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions.\n\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, respond with a JSON function call.\n\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

RAG_STYLE = r"""{%- if documents is not none %}<|im_start|>system
Documents:
{%- for d in documents %}
[{{ loop.index }}] {{ d.title }}: {{ d.text }}
{%- endfor %}
<|im_end|>
{% else %}<|im_start|>system
(no documents; tools={{ tools }})<|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

GENERATION_STYLE = r"""{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {%- if message.reasoning_content is defined %}{{- '<think>' + message.reasoning_content + '</think>\n' }}{%- endif %}
            {{- message.content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

SPECIALS_STYLE = r"""bos={{ bos_token if bos_token is defined else 'UNDEFINED' }} eos={{ eos_token }} pad={{ pad_token }}
unk={{ unk_token if unk_token is defined else 'UNDEFINED' }} sep={{ sep_token if sep_token is defined else 'UNDEFINED' }}
mask={{ mask_token if mask_token is defined else 'UNDEFINED' }} image={{ image_token if image_token is defined else 'UNDEFINED' }}
additional={{ additional_special_tokens if additional_special_tokens is defined else 'UNDEFINED' }}
{% for m in messages %}{{ m.role }}: {{ m.content }}
{% endfor %}"""

TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b <é> & \"quotes\"",
                                           "parameters": {"type": "object",
                                                          "properties": {"a": {"type": "integer"}},
                                                          "required": ["a"]}}}]
TOOL_CHAT = [
    {"role": "system", "content": "Use tools when they help."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 4 + 4?"},
]
REASONING_CHAT = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5", "reasoning": "two plus three is five"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8", "thinking": "four and four"},
    {"role": "user", "content": "And 1 + 1?"},
    {"role": "assistant", "content": "2", "reasoning_content": "one and one", "thinking": "ignored: not first"},
]
DOCUMENTS = [{"title": "Sums", "text": "2 + 3 = 5"}, {"title": "Café", "text": "naïve <b>bold</b>"}]


def _template_pair(tmp_path, template=None, **config):
    """(ours, transformers') tokenizers for the tiny tokenizer.json with `template` and extra tokenizer_config fields."""
    transformers = pytest.importorskip("transformers")
    import json
    import os
    import shutil

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = tmp_path / "tok"
    d.mkdir(parents=True)
    shutil.copy(os.path.join(repo, "assets", "tiny-qwen3", "tokenizer.json"), d / "tokenizer.json")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": IM_END, "pad_token": PAD_TOKEN, **config}
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer.from_dir(str(d)), transformers.AutoTokenizer.from_pretrained(str(d))


def _same(ours, hf, messages, **kwargs):
    ref = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    got = ours.apply_chat_template(messages, tokenize=False, **kwargs)
    assert got == ref
    assert ours.apply_chat_template(messages, tokenize=True, **kwargs) == hf.encode(ref, add_special_tokens=False)
    return ref


@pytest.mark.parametrize("template", [QWEN25_STYLE, QWEN3_STYLE, LLAMA31_STYLE, RAG_STYLE, GENERATION_STYLE],
                         ids=["qwen2.5", "qwen3", "llama3.1", "rag", "generation"])
def test_chat_templates_render_as_transformers_does(tmp_path, template):
    ours, hf = _template_pair(tmp_path, template, bos_token="<|im_start|>")
    chats = [TOOL_CHAT, REASONING_CHAT, TOOL_CHAT[1:2]]
    if template is GENERATION_STYLE:  # it renders content only: no tool calls
        chats = [REASONING_CHAT, [m for m in TOOL_CHAT if m["role"] != "tool" and m.get("content")]]
    for messages in chats:
        for gen in (False, True):
            _same(ours, hf, messages, add_generation_prompt=gen)
            _same(ours, hf, messages, add_generation_prompt=gen, tools=TOOLS)
            _same(ours, hf, messages, add_generation_prompt=gen, documents=DOCUMENTS)
    if template is QWEN3_STYLE:
        no_think = _same(ours, hf, REASONING_CHAT[:1], add_generation_prompt=True, enable_thinking=False)
        assert no_think.endswith("<think>\n\n</think>\n\n")
        assert "two plus three" not in _same(ours, hf, REASONING_CHAT[:3])  # before the last query: dropped
        assert "<think>\none and one\n</think>" in _same(ours, hf, REASONING_CHAT)  # reasoning_content wins
    if template is LLAMA31_STYLE:
        assert "Environment: ipython" not in _same(ours, hf, TOOL_CHAT[:2])  # tools is none -> no tool header
        assert "Today Date: 01 Jan 2025" in _same(ours, hf, TOOL_CHAT[:2], date_string="01 Jan 2025")
        assert _same(ours, hf, TOOL_CHAT[:2], tools=TOOLS, tools_in_user_message=False).count('"name": "add"') == 1
    if template is RAG_STYLE:
        assert "(no documents; tools=None)" in _same(ours, hf, TOOL_CHAT[1:2])
        assert "[2] Café: naïve <b>bold</b>" in _same(ours, hf, TOOL_CHAT[1:2], documents=DOCUMENTS)
    if template is QWEN25_STYLE:
        assert "[no content key]" in _same(ours, hf, TOOL_CHAT)  # content=None is dropped, as transformers does


def test_reasoning_reaches_the_template_under_every_name(tmp_path):
    ours, hf = _template_pair(tmp_path, "{% for m in messages %}[{{ m.reasoning_content }}|{{ m.thinking }}]"
                                        "{% endfor %}")
    text = _same(ours, hf, REASONING_CHAT)
    assert text == "[|][two plus three is five|two plus three is five][|][four and four|four and four][|]" \
                   "[one and one|ignored: not first]"


def test_special_token_map_reaches_the_template(tmp_path):
    extra = dict(bos_token="<|im_start|>", unk_token="<|endoftext|>", image_token="<|im_start|>",
                 additional_special_tokens=["<|im_start|>"])
    for i, config in enumerate(({}, extra, {**extra, "bos_token": None})):
        ours, hf = _template_pair(tmp_path / str(i), SPECIALS_STYLE, **config)
        text = _same(ours, hf, TOOL_CHAT[1:2])
        if config.get("unk_token"):
            assert "unk=<|endoftext|>" in text and "image=<|im_start|>" in text
        if not config.get("bos_token"):
            assert "bos=UNDEFINED" in text  # an absent token is not defined at all (was an empty string)


def test_generation_blocks_give_the_assistant_mask_transformers_gives(tmp_path):
    ours, hf = _template_pair(tmp_path, GENERATION_STYLE)
    chat = [m for m in TOOL_CHAT if m["role"] != "tool" and m.get("content")] + REASONING_CHAT
    ref = hf.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    got = ours.apply_chat_template(chat, tokenize=True, return_assistant_tokens_mask=True)
    assert got["input_ids"] == ref["input_ids"]
    assert got["assistant_masks"] == ref["assistant_masks"]
    marked = [i for i, m in zip(got["input_ids"], got["assistant_masks"]) if m]
    assert ours.decode(marked, skip_special_tokens=False) == \
        "It is 5.<|im_end|><think>two plus three is five</think>\n5<|im_end|>" \
        "<think>four and four</think>\n8<|im_end|><think>one and one</think>\n2<|im_end|>"
    with pytest.raises(ValueError, match="tokenize=True"):
        ours.apply_chat_template(chat, return_assistant_tokens_mask=True)
    plain, _ = _template_pair(tmp_path / "plain", QWEN25_STYLE)
    with pytest.raises(ValueError, match="generation"):
        plain.apply_chat_template(chat, tokenize=True, return_assistant_tokens_mask=True)


def test_named_templates_and_template_files_are_chosen_as_transformers_chooses(tmp_path):
    named = [{"name": "default", "template": "D{{ tools is none }}"},
             {"name": "tool_use", "template": "T{{ tools | length }}"}]
    ours, hf = _template_pair(tmp_path, named)
    assert _same(ours, hf, TOOL_CHAT[1:2]) == "DTrue"
    assert _same(ours, hf, TOOL_CHAT[1:2], tools=TOOLS) == "T1"
    assert ours.apply_chat_template(TOOL_CHAT[1:2], chat_template="tool_use", tools=[]) == "T0"
    ours.save(str(tmp_path / "saved"))  # the named templates survive our save
    again = Tokenizer.from_dir(str(tmp_path / "saved"))
    assert again.apply_chat_template(TOOL_CHAT[1:2], tools=TOOLS) == "T1"
    # chat_template.jinja wins over tokenizer_config.json's template, as in transformers
    (tmp_path / "tok" / "chat_template.jinja").write_text("FILE {{ messages | length }}")
    import transformers
    hf2 = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ours2 = Tokenizer.from_dir(str(tmp_path / "tok"))
    assert _same(ours2, hf2, TOOL_CHAT) == "FILE 6"
