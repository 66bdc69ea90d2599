"""Write a run's tokenizer as a Hugging Face tokenizer directory (convert export-hf): tokenizer.json,
tokenizer_config.json (special tokens, the chat template in use) and generation_config.json (bos, pad
and every stop id as eos), so `AutoTokenizer.from_pretrained(out)` gives the same ids and template."""
from __future__ import annotations

import json
import os
import shutil

from moejax.tokenizer.base import ChatTokenizer


def _json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def moejax_to_tokenizers(tok):
    """moejax's own SentencePiece model as a `tokenizers` BPE with the same ids: the vocabulary in id
    order, merges derived from it (as transformers derives them), byte fallback, spaces as "▁" with no
    prefix added (the model was trained without a dummy prefix), chat markers as added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    from moejax.tokenizer.sentencepiece_convert import generate_merges

    sp = tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tk = Tokenizer(BPE(vocab=vocab, merges=generate_merges(vocab), fuse_unk=True, byte_fallback=True,
                       unk_token=sp.id_to_piece(sp.unk_id())))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    control = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    tk.add_special_tokens([AddedToken(sp.id_to_piece(i), normalized=False, special=True) for i in control])
    from moejax.tokenizer.moejax_spm import SPECIAL_TOKENS
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in SPECIAL_TOKENS])
    return tk


def write_tokenizer(tok: ChatTokenizer, out_dir: str) -> None:
    from moejax.tokenizer.hf import HFTokenizer

    os.makedirs(out_dir, exist_ok=True)
    if isinstance(tok, HFTokenizer) and os.path.isfile(os.path.join(tok.path, "tokenizer.json")):
        # The checkpoint's own files, verbatim: transformers reads them as it read the original.
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(tok.path, name)):
                shutil.copyfile(os.path.join(tok.path, name), os.path.join(out_dir, name))
        config = dict(tok.config)
    elif isinstance(tok, HFTokenizer):  # converted from a SentencePiece model
        tok.tk.save(os.path.join(out_dir, "tokenizer.json"))
        config = {k: v for k, v in tok.config.items() if k != "tokenizer_class"}
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        moejax_to_tokenizers(tok).save(os.path.join(out_dir, "tokenizer.json"))
        shutil.copyfile(tok.path, os.path.join(out_dir, "tokenizer.model"))  # for sentencepiece users
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    config.update(tok.special_tokens)
    config.pop("chat_template", None)
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    jinja = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        os.unlink(jinja)
    _json(os.path.join(out_dir, "tokenizer_config.json"), config)
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids), "pad_token_id": tok.pad_id}
    _json(os.path.join(out_dir, "generation_config.json"), {k: v for k, v in gen.items() if v is not None})
