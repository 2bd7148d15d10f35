import json

import pytest

from errors import ForgetlabError
from model.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days.",
    "3.14159 + 2,718 = 5.86",
    "  leading spaces and trailing  ",
    "line one\nline two\n\n\tindented\r\n",
    "def f(x):\n    return x**2  # square\n",
    "Ünïcödé: naïve café, 日本語, Ελληνικά",
    "emoji 🙂 👍🏽 and a ZWJ family 👨‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>\n",
    "https://example.com/a?b=c&d=e",
    "MiXeD CaSe, ALLCAPS and don't won't",
    "",
]

SMOLLM_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke\nabout cats."}],
]

# Written from Meta's documented Llama 3 / 3.1 prompt format; block tags on their own lines exercise
# the `-` whitespace control, the indented no-dash `if` at the end trim_blocks / lstrip_blocks, strftime_now
# the date helper and `tools is not none` (as in Meta's 3.1 template) that `tools` is defined as None.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- set date_string = strftime_now("%d %b %Y") %}
{%- if tools is not none %}
    {{- raise_exception('this template takes no tools') }}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
    {% if add_generation_prompt %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
    {%- endif %}
"""
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def tok(smollm_dir):
    return Tokenizer.from_dir(smollm_dir)


@pytest.fixture(scope="module")
def hf_tok(smollm_dir):
    return pytest.importorskip("transformers").AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="module")
def llama3_dir(smollm_dir, tmp_path_factory):
    """SmolLM2's BPE plus Llama 3's header tokens, with a Llama-3-Instruct chat template."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    d = tmp_path_factory.mktemp("llama3")
    rust = RustTokenizer.from_file(str(smollm_dir / "tokenizer.json"))
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    rust.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": False, "chat_template": LLAMA3_TEMPLATE}))
    ids = {t: rust.token_to_id(t) for t in LLAMA3_SPECIALS}
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}))
    return d


@pytest.mark.real_model
def test_digits_are_split_one_by_one(tok):
    ids = tok.encode("2024")
    assert [tok.decode([i]) for i in ids] == ["2", "0", "2", "4"]


@pytest.mark.real_model
def test_chat_control_tokens_encode_to_single_ids(tok):
    assert tok.encode("<|im_start|>") == [tok.token_id("<|im_start|>")]
    assert tok.encode("<|im_end|>") == [tok.token_id("<|im_end|>")]
    assert tok.encode("<|im_start|>user") == [tok.token_id("<|im_start|>"), tok.token_id("user")]


@pytest.mark.real_model
def test_special_ids_follow_the_checkpoint_config(tok):
    assert tok.bos_id == tok.token_id("<|im_start|>")
    assert tok.eos_ids == [tok.token_id("<|im_end|>")] == [tok.pad_id]
    assert tok.token_id("<|im_end|>") in tok.stop_ids
    assert tok.vocab_size == 49152
    assert tok.encode("hi", add_bos=True) == [tok.bos_id] + tok.encode("hi")
    assert tok.encode_batch(["hi", "2024"]) == [tok.encode("hi"), tok.encode("2024")]


@pytest.mark.real_model
@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False).input_ids
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    if "<|" not in text:
        assert tok.decode(ids) == text


@pytest.mark.real_model
@pytest.mark.parametrize("messages", SMOLLM_CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(tok, hf_tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n")


@pytest.mark.real_model
@pytest.mark.parametrize("messages", SMOLLM_CHATS)
def test_llama3_chat_template_matches_transformers(llama3_dir, messages):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_dir(llama3_dir)
    hf = transformers.AutoTokenizer.from_pretrained(llama3_dir)
    text = ours.apply_chat_template(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: ")
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids
    assert ours.token_id("<|eot_id|>") in ours.stop_ids and ours.bos_id == ours.token_id("<|begin_of_text|>")


@pytest.mark.real_model
def test_template_raise_exception_becomes_forgetlab_error(llama3_dir):
    with pytest.raises(ForgetlabError, match="unknown role tool"):
        Tokenizer.from_dir(llama3_dir).apply_chat_template([{"role": "tool", "content": "x"}])


def test_missing_tokenizer_json_names_the_path(tmp_path):
    with pytest.raises(ForgetlabError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.real_model
def test_missing_chat_template_names_the_config_file(smollm_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((smollm_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ForgetlabError, match="tokenizer_config.json: no chat_template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
