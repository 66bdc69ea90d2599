"""Hugging Face tokenizer directories: tokenizer.json through the `tokenizers` library (what
transformers' fast tokenizers run), tokenizer_config.json for special tokens, added tokens and the
chat template (a chat_template.jinja file next to it wins), generation_config.json for extra eos ids.
A directory with only a SentencePiece tokenizer.model is converted as transformers converts it."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from moejax.errors import UserError
from moejax.tokenizer.base import ChatTokenizer

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# End-of-turn markers of the stock chat templates (Llama-3 <|eot_id|>/<|eom_id|>, ChatML <|im_end|>,
# Gemma <end_of_turn>, Phi-3 <|end|>): generation stops at them and masks end after them.
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")
# Files that make up a tokenizer (copied by import-hf, written by export-hf).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "tokenizer.model", "generation_config.json")


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_chat_template(directory: str, config: dict) -> str | None:
    """chat_template.jinja wins; then chat_template.json; then tokenizer_config's chat_template (a string,
    or a list of {name, template} of which `default` is used, as transformers does)."""
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    side = os.path.join(directory, "chat_template.json")
    if template is None and os.path.isfile(side):
        template = _read_json(side).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(f"{directory}: chat_template is a list of named templates without 'default' "
                            f"({', '.join(map(str, named))}); set data.chat_template")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise UserError(f"{directory}: chat_template must be a string or a list of {{name, template}}")
    return template


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization (applied when clean_up_tokenization_spaces is true)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class HFTokenizer(ChatTokenizer):
    def __init__(self, tk, directory: str, config: dict, chat_template: str | None,
                 generation_config: dict | None = None):
        from tokenizers import AddedToken

        self.tk, self.path, self.config = tk, directory, config
        self.chat_template = chat_template
        # Added tokens of tokenizer_config.json that tokenizer.json lacks (transformers adds them too).
        for key, tok in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            content = _content(tok)
            if content is not None and tk.token_to_id(content) is None:
                added = AddedToken(content, single_word=tok.get("single_word", False),
                                   lstrip=tok.get("lstrip", False), rstrip=tok.get("rstrip", False),
                                   normalized=tok.get("normalized", not tok.get("special", False)),
                                   special=tok.get("special", False))
                (tk.add_special_tokens if tok.get("special", False) else tk.add_tokens)([added])
        from moejax.tokenizer.hf_classes import DEFAULTS, class_name

        defaults = DEFAULTS.get(class_name(config), {})
        self.special_tokens = {k: _content(config[k] if k in config else defaults.get(k)) for k in SPECIAL_KEYS}
        self.special_tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
        missing = [v for v in self.special_tokens.values() if tk.token_to_id(v) is None]
        tk.add_special_tokens([AddedToken(v, normalized=False, special=True) for v in dict.fromkeys(missing)])
        ids = {k: tk.token_to_id(v) for k, v in self.special_tokens.items()}
        self.bos_id = ids.get("bos_token")
        self.eos_id = ids.get("eos_token")
        self.pad_id = ids.get("pad_token")
        if self.pad_id is None:  # packing pads with it and masks it out; any id works
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        stops = [self.eos_id] + [tk.token_to_id(t) for t in END_OF_TURN]
        eos_cfg = (generation_config or {}).get("eos_token_id")
        stops += eos_cfg if isinstance(eos_cfg, list) else [eos_cfg]
        self.stop_ids = tuple(dict.fromkeys(i for i in stops if isinstance(i, int)))
        # transformers 5 ignores clean_up_tokenization_spaces for BPE models (it would strip spaces
        # before punctuation) unless forced.
        is_bpe = type(tk.model).__name__ == "BPE"
        self._clean = bool(config.get("clean_up_tokenization_spaces", False)) and (
            not is_bpe or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))

    @classmethod
    def from_directory(cls, directory: str) -> "HFTokenizer":
        from tokenizers import Tokenizer

        config_path = os.path.join(directory, "tokenizer_config.json")
        config = _read_json(config_path) if os.path.isfile(config_path) else {}
        gen_path = os.path.join(directory, "generation_config.json")
        generation = _read_json(gen_path) if os.path.isfile(gen_path) else None
        tj = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(tj):
            try:
                tk = Tokenizer.from_file(tj)
            except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
                raise UserError(f"{tj}: not a tokenizers file ({e})") from None
            from moejax.tokenizer.hf_classes import rebuild

            rebuild(tk, tj, config)
        else:
            from moejax.tokenizer.sentencepiece_convert import convert

            tk = convert(os.path.join(directory, "tokenizer.model"), config)
        return cls(tk, directory, config, read_chat_template(directory, config), generation)

    # -- tokens ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Largest id + 1 (added tokens included): the embedding rows the ids need, len(tokenizer)."""
        return max(self.tk.get_vocab(with_added_tokens=True).values()) + 1

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # As transformers 5: skipping drops every added token flagged special (tokenizers' own rule).
        text = self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self._clean else text

    def save(self, out_dir: str) -> None:
        """Write tokenizer.json, tokenizer_config.json (special tokens, chat template) for export-hf."""
        os.makedirs(out_dir, exist_ok=True)
        self.tk.save(os.path.join(out_dir, "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if k not in ("chat_template",)}
        config.update(self.special_tokens)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
