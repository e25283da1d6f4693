"""Named caption sets: several captions per image, each set in its own folder of one output.

    OUT/captions/          the default set (named `default`): image bytes, `<key>.txt`, `<key>.json`
    OUT/captions-<NAME>/   another set: `<key>.txt` and `<key>.json` only (the image bytes are in `images/`)

Every set has its own model, prompt, provenance and config hash, and resumes on its own; all share `images/`'s
shard names and keys, so readers join sets by key. Where the sets live, and which names they may take, is
`curation.layout`'s (`Layout.captions`, `Layout.caption_sets`, `check_set_name`). Prompts are `str.format`
templates that may use `{original}`, the sample's original caption (write `{{` for a literal brace).
"""

from __future__ import annotations

import string

from curation.errors import ConfigError
from curation.layout import ORIGINAL


def template_fields(prompt: str) -> set[str]:
    """The `{fields}` a prompt template uses; ConfigError for a malformed template or a field other than original."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"prompt template {prompt!r}: {exc} (write {{{{ for a literal brace)") from None
    if used - {ORIGINAL}:
        raise ConfigError(f"prompt template {prompt!r} uses {sorted(used - {ORIGINAL})}: only {{original}} is known")
    return used
