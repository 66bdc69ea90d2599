"""transformers 5 rebuilds some tokenizer classes from tokenizer.json's vocabulary and merges with
the class's own normalizer, pre-tokenizer and decoder (keeping the file's post-processor), instead of
running tokenizer.json as written. Each entry here does the same for one `tokenizer_class` of
tokenizer_config.json, so ids equal AutoTokenizer's; classes not listed run tokenizer.json as is
(PreTrainedTokenizerFast / TokenizersBackend, e.g. Llama-3)."""
from __future__ import annotations

import json
from typing import Callable

from moejax.registry import Registry

Rebuild = Callable[[object, dict, dict], None]  # (tokenizers.Tokenizer, tokenizer.json, tokenizer_config)
CLASSES: Registry[Rebuild] = Registry("tokenizer class")


# Special tokens a class's __init__ defaults to when tokenizer_config.json does not name them; one
# missing from the vocabulary is added as a special token (as transformers does).
DEFAULTS = {
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "GemmaTokenizer": {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                       "mask_token": "<mask>"},
}


def class_name(config: dict) -> str:
    return (config.get("tokenizer_class") or "").removesuffix("Fast")


def _vocab_merges(tj: dict) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = tj.get("model", {})
    vocab = model.get("vocab") or {}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    return vocab, merges


def rebuild(tk, tokenizer_json_path: str, config: dict) -> None:
    name = class_name(config)
    if name not in CLASSES:
        return
    with open(tokenizer_json_path, encoding="utf-8") as f:
        tj = json.load(f)
    if tj.get("model", {}).get("type") != "BPE":  # the classes below are BPE; others run as written
        return
    CLASSES.get(name)(tk, tj, config)


@CLASSES.register("LlamaTokenizer")
def _llama(tk, tj: dict, config: dict) -> None:
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = _vocab_merges(tj)
    tk.model = BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None)
    tk.normalizer = None
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    scheme = ("first" if not config.get("legacy", False) else "always") if add_prefix_space else "never"
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    seq = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        seq.append(decoders.Strip(content=" ", left=1))
    tk.decoder = decoders.Sequence(seq)


QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


@CLASSES.register("Qwen2Tokenizer")
def _qwen2(tk, tj: dict, config: dict) -> None:
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = _vocab_merges(tj)
    tk.model = BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                   end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    tk.decoder = decoders.ByteLevel()
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space") or False), use_regex=False)])


@CLASSES.register("GemmaTokenizer")
def _gemma(tk, tj: dict, config: dict) -> None:
    from tokenizers import decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = _vocab_merges(tj)
    unk = config.get("unk_token", "<unk>")
    unk = unk.get("content") if isinstance(unk, dict) else unk
    tk.model = BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=str(unk), dropout=None, byte_fallback=True)
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.normalizer = normalizers.Replace(" ", "▁")
