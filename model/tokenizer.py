"""Tokenizer for HF-format checkpoint directories: `tokenizers` for the BPE, jinja2 for the chat template.

`Tokenizer.from_dir(path)` reads

    tokenizer.json            the full tokenization pipeline (model, pre-tokenizer, added tokens, decoder)
    tokenizer_config.json     special-token strings and the chat template
    special_tokens_map.json   (optional) special-token strings, older layout
    generation_config.json    (optional) eos id(s): Llama-3 lists several

Chat formatting renders the checkpoint's own jinja chat template (the `chat_template` string shipped in
tokenizer_config.json) rather than hand-written formatters per model family. The template is the
definition of the prompt format the model was tuned on, so rendering it the way transformers does
(sandboxed jinja2, trim_blocks + lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that does not
HTML-escape, the special-token strings as variables) gives character-exact parity with
`transformers.PreTrainedTokenizer.apply_chat_template` for any checkpoint: ChatML
(`<|im_start|>role\\n...<|im_end|>`) for SmolLM2, header tokens for Llama 3, and whatever a future
checkpoint ships, with no per-family code to get subtly wrong.

Encoding never adds special tokens implicitly: `encode(text, add_bos=True)` is the only way a BOS appears,
and a chat template writes its own BOS where the model expects one. Decoding does not apply transformers'
legacy "clean up tokenization spaces" (transformers itself ignores it for BPE tokenizers).
"""
import json
from datetime import datetime
from pathlib import Path

from errors import ForgetlabError, read_json_object

# Tokens that end an assistant turn or a document in common chat formats; generation stops on any of them
# that the vocabulary has, in addition to the configured eos ids.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>")

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_string(value):
    """tokenizer_config stores special tokens as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class Tokenizer:
    """Text <-> token ids and chat-template rendering for one checkpoint directory.

    Attributes:
        bos_id:      id of the BOS token, or None if the model has none.
        eos_ids:     ids that end generation per the checkpoint's config (a list: Llama 3 has several).
        pad_id:      id used for padding; the eos id when the checkpoint defines no pad token.
        adds_bos:    True when the checkpoint's tokenizer prepends BOS to plain text by default.
        stop_ids:    eos_ids plus end-of-turn tokens present in the vocab (END_OF_TURN_TOKENS).
        vocab_size:  number of ids, added tokens included.
        special_tokens: {"bos_token": str, ...} strings the chat template can refer to.
    """

    def __init__(self, tokenizer, config: dict, generation_config: dict | None = None, source: str = "<memory>"):
        self._tok = tokenizer
        self.source = source
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):
            # Multi-template layout: [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        self.special_tokens = {k: _token_string(config[k]) for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None}
        generation_config = generation_config or {}

        bos = self.special_tokens.get("bos_token")
        self.bos_id = self.token_id(bos) if bos is not None else generation_config.get("bos_token_id")

        # The tokenizer's eos first (it is the pad fallback), then any extra ids generation_config lists.
        eos = self.special_tokens.get("eos_token")
        eos_ids = [self.token_id(eos)] if eos is not None and self.token_id(eos) is not None else []
        eos_ids += [int(i) for i in _as_list(generation_config.get("eos_token_id"))]
        self.eos_ids = list(dict.fromkeys(eos_ids))  # dedupe, keep order

        pad = self.special_tokens.get("pad_token")
        pad_id = self.token_id(pad) if pad is not None else generation_config.get("pad_token_id")
        self.pad_id = pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else None)

        turn_ends = [self.token_id(t) for t in END_OF_TURN_TOKENS]
        self.stop_ids = list(dict.fromkeys(self.eos_ids + [i for i in turn_ends if i is not None]))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # Whether the checkpoint's own pipeline puts a BOS before plain text (Llama 3 does, SmolLM2 does not):
        # callers encode plain text with add_bos=tok.adds_bos to feed the model what it was trained on.
        probe = self._tok.encode("a", add_special_tokens=True).ids
        self.adds_bos = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id
        self._template = None  # compiled lazily: most training code never renders a chat

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ForgetlabError(f"{tok_file}: tokenizer file not found (is {path} a prepared checkpoint?)")
        try:
            tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust loader raises a bare Exception on malformed files
            raise ForgetlabError(f"{tok_file}: cannot load tokenizer: {e}") from None
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins on conflicts
            if (path / name).is_file():
                config.update(read_json_object(path / name, "tokenizer config"))
        gen_file = path / "generation_config.json"
        generation_config = read_json_object(gen_file, "generation config") if gen_file.is_file() else None
        return cls(tok, config, generation_config, source=str(path))

    # ------------------------------------------------------------------ ids

    def token_id(self, token: str):
        """Id of a single vocabulary entry (e.g. "<|im_end|>"), or None if absent."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ForgetlabError(f"{self.source}: add_bos requested but the tokenizer has no bos token")
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` over many texts, parallelised by the Rust tokenizer."""
        if add_bos and self.bos_id is None:
            raise ForgetlabError(f"{self.source}: add_bos requested but the tokenizer has no bos token")
        prefix = [self.bos_id] if add_bos else []
        return [prefix + e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat template.

        add_generation_prompt appends the header that opens an assistant turn ("<|im_start|>assistant\\n"
        for ChatML), so the next generated token is the answer's first.
        """
        if self.chat_template is None:
            raise ForgetlabError(f"{Path(self.source) / 'tokenizer_config.json'}: no chat_template in this checkpoint")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=None,  # templates test `tools is not none`; an undefined name would pass that test
            documents=None,
            **self.special_tokens,
        )


def _compile_template(source: str):
    """Compile a chat template in a sandbox configured like transformers' renderer."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ForgetlabError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's built-in tojson HTML-escapes '<', '>', '&', which would corrupt prompts.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ForgetlabError(f"chat_template:{e.lineno}: invalid jinja: {e.message}") from None
