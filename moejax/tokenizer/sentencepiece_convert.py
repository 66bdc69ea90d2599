"""A bare SentencePiece BPE tokenizer.model (Llama-2, Mistral) as a `tokenizers` Tokenizer, built the
way transformers 5 builds LlamaTokenizer from it: the vocabulary in id order, merges derived from it
(each piece's splits into two pieces of the vocabulary, ordered by the piece's id), byte fallback,
a Metaspace pre-tokenizer that prepends "▁" to the first word only (legacy=False) and the matching
decoder; control pieces are special added tokens, user-defined pieces plain added tokens."""
from __future__ import annotations

from moejax.errors import UserError


def generate_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for piece, rank in vocab.items():
        local = [(piece[:k], piece[k:], rank) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(a, b) for a, b, _ in merges]


def convert(path: str, config: dict):
    """Tokenizer for `path`; fills config's bos/eos/unk_token defaults (<s>, </s>, <unk>) in place."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    sp = spm.SentencePieceProcessor()
    try:
        sp.load(path)
    except (OSError, RuntimeError) as e:
        raise UserError(f"tokenizer file {path!r} is not a SentencePiece model ({e})") from None
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    unk = config.get("unk_token", "<unk>")
    unk = unk.get("content") if isinstance(unk, dict) else unk
    tk = Tokenizer(BPE(vocab=vocab, merges=generate_merges(vocab), fuse_unk=True, byte_fallback=True,
                       dropout=None, unk_token=unk if unk in vocab else None))
    tk.normalizer = None
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    legacy = config.get("legacy", False)
    scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    seq = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        seq.append(decoders.Strip(content=" ", left=1))
    tk.decoder = decoders.Sequence(seq)
    user = _user_defined(path)
    added = [AddedToken(sp.id_to_piece(i), normalized=False, special=sp.is_control(i) or sp.is_unknown(i))
             for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i) or i in user]
    tk.add_special_tokens([a for a in added if a.special])
    tk.add_tokens([a for a in added if not a.special])
    # add_bos_token (default true) / add_eos_token (default false) as LlamaTokenizer's post-processor.
    from tokenizers import processors
    bos = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
    eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
    add_bos = config.get("add_bos_token", True) and bos is not None
    add_eos = config.get("add_eos_token", False) and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    for key, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
        if key not in config and default in vocab:
            config[key] = default
    return tk


def _user_defined(path: str) -> set[int]:
    """Ids of user-defined pieces (type 4 in sentencepiece_model.proto), read from the model proto."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # protobuf missing: no user-defined symbols are known
        return set()
    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return {i for i, p in enumerate(proto.pieces) if p.type == 4}
