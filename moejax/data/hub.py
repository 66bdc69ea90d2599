"""`hf:ORG/NAME`: a dataset already in the local Hugging Face hub cache, found offline.

The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (where
`huggingface-cli download --repo-type dataset ORG/NAME` and `datasets` put it), with the layout
`datasets--ORG--NAME/snapshots/<revision>/...`. The revision is `refs/main`'s when present, else the
newest snapshot. Its data files are parquet, else jsonl, else json (a `.json` file holding one object
per line is read as jsonl); when some file names say `train`, only those are used.
"""
from __future__ import annotations

import glob
import os

from moejax.errors import UserError

KINDS = (("parquet", (".parquet",)), ("jsonl", (".jsonl",)), ("json", (".json",)))
_NOT_DATA = {"dataset_infos.json", "dataset_info.json", "state.json", "config.json"}


def hub_cache_dirs() -> list[str]:
    if os.environ.get("HF_HUB_CACHE"):
        return [os.environ["HF_HUB_CACHE"]]
    if os.environ.get("HF_HOME"):
        return [os.path.join(os.environ["HF_HOME"], "hub")]
    return [os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")]


def snapshot_dir(name: str) -> str:
    if name.count("/") != 1 or not all(name.split("/")):
        raise UserError(f"data.source = 'hf:{name}': expected hf:ORG/NAME, e.g. hf:teknium/OpenHermes-2.5")
    tried = []
    for root in hub_cache_dirs():
        repo = os.path.join(root, "datasets--" + name.replace("/", "--"))
        tried.append(repo)
        snaps = os.path.join(repo, "snapshots")
        if not os.path.isdir(snaps):
            continue
        ref = os.path.join(repo, "refs", "main")
        if os.path.isfile(ref):
            with open(ref, encoding="utf-8") as f:
                rev = f.read().strip()
            if os.path.isdir(os.path.join(snaps, rev)):
                return os.path.join(snaps, rev)
        revs = sorted(glob.glob(os.path.join(snaps, "*")), key=os.path.getmtime)
        if revs:
            return revs[-1]
    raise UserError(f"data.source = 'hf:{name}': not in the local Hugging Face cache (looked for "
                    f"{', '.join(tried)}); download it first, e.g. `huggingface-cli download "
                    f"--repo-type dataset {name}`, or set HF_HUB_CACHE / HF_HOME")


def _looks_like_jsonl(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == b"{"


def data_files(name: str) -> tuple[str, list[str]]:
    """(kind, files) of dataset ORG/NAME: kind is parquet, jsonl or json."""
    snap = snapshot_dir(name)
    for kind, exts in KINDS:
        files = sorted(p for p in glob.glob(os.path.join(snap, "**", "*"), recursive=True)
                       if p.endswith(exts) and os.path.basename(p) not in _NOT_DATA and os.path.isfile(p))
        if not files:
            continue
        train = [p for p in files if "train" in os.path.relpath(p, snap).lower()]
        files = train or files
        if kind == "json" and all(_looks_like_jsonl(p) for p in files):
            kind = "jsonl"
        return kind, files
    raise UserError(f"data.source = 'hf:{name}': {snap} holds no .parquet, .jsonl or .json files")
