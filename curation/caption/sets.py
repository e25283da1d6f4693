"""Named caption sets: several captions per image, each set in its own folder of one output.

    OUT/captions/          the default set (named `default`): image bytes, `<key>.txt`, `<key>.json`
    OUT/captions-<NAME>/   another set: `<key>.txt` and `<key>.json` only (the image bytes are in `images/`)

Every set has its own model, prompt, provenance and config hash, and resumes on its own; all share `images/`'s
shard names and keys, so readers join sets by key. Prompts are `str.format` templates that may use `{original}`,
the sample's original caption (write `{{` for a literal brace).
"""

from __future__ import annotations

import re
import string

DEFAULT_SET = "default"
ORIGINAL = "original"  # the samples' own captions (alt-text, prompts): a field everywhere a set name is taken
_NAME = re.compile(r"[a-z0-9_]+")
# Names the output layout, the field names or Σ's index fields use: a set so named would read as something else.
RESERVED = frozenset(
    {ORIGINAL, "caption", "captions", "images", "dedup", "stats", "report", "features", "listings", "logs",
     "hashes", "edges", "summary", "run_config", "t5", "vae", "prompt", "sharegpt4v"}
)  # fmt: skip


def check_set_name(name: str) -> str:
    """The name, when it can name a caption set; ValueError (one line) otherwise."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"caption set name {name!r} must match [a-z0-9_]+")
    if name in RESERVED:
        raise ValueError(f"caption set name {name!r} is reserved (taken by the output layout or a field)")
    return name


def set_dir(name: str) -> str:
    """Folder of a caption set, relative to the output: `captions` for the default set."""
    return "captions" if check_set_name(name) == DEFAULT_SET else f"captions-{name}"


def named_sets(output: str) -> list[str]:
    """The caption sets of an output with at least one done shard, the default set first."""
    from curation.shards import StageDir

    root = output.rstrip("/")
    base = StageDir(root)
    found = []
    if StageDir(f"{root}/captions").done_shards():
        found.append(DEFAULT_SET)
    if base.fs.exists(base.root):
        for path in sorted(base.fs.ls(base.root, detail=False)):
            folder = path.rstrip("/").rsplit("/", 1)[-1]
            name = folder.removeprefix("captions-")
            if folder.startswith("captions-") and _NAME.fullmatch(name) and StageDir(f"{root}/{folder}").done_shards():
                found.append(name)
    return found


def template_fields(prompt: str) -> set[str]:
    """The `{fields}` a prompt template uses; ValueError for a malformed template or a field other than original."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
    except ValueError as exc:
        raise ValueError(f"prompt template {prompt!r}: {exc} (write {{{{ for a literal brace)") from None
    if used - {ORIGINAL}:
        raise ValueError(f"prompt template {prompt!r} uses {sorted(used - {ORIGINAL})}: only {{original}} is known")
    return used
