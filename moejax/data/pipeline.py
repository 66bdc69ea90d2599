"""The top of the data flow: from a config to packed batches (train and eval), and the plain-text
renderings the tokenizer trainer reads. Imports sources, chat and packing; nothing here is imported
by them."""
from __future__ import annotations

from typing import Any, Iterator

from moejax.config import Config
from moejax.data.packing import Packer
from moejax.data.sources import Source


def make_packer(cfg: Config, source: Source, tokenizer: Any, *, shard_index: int = 0,
                shard_count: int = 1, workers: int | None = None) -> Packer:
    """The packer of `cfg` over `source`: seq_len, batch size, seed, background workers, template."""
    dc = cfg.data
    return Packer(source, tokenizer, dc.seq_len, cfg.train.batch_size, cfg.train.seed,
                  shard_index=shard_index, shard_count=shard_count,
                  workers=dc.workers if workers is None else workers, prefetch=dc.prefetch,
                  chat_template=getattr(dc, "chat_template", "") or None)


def iter_texts(source: Source, limit: int | None = None) -> Iterator[str]:
    """The plain-text renderings (moejax's chat template, `moejax.tokenizer.render`) of up to `limit`
    examples, spread evenly over the source so a file sorted by domain still shows every domain."""
    from moejax.tokenizer.moejax_spm import render

    n = len(source)
    count = n if limit is None else min(limit, n)
    for j in range(count):
        yield render(source[j * n // count])
