"""The production noun path against the plain NLTK oracle, and the exactness of mergeable counts."""

from __future__ import annotations

import json
import random
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from curation.stats.nouns import (
    NounExtractor,
    NounStats,
    count_captions,
    decode_caption,
    reference_nouns,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
COCO_CAPTIONS = SHARED / "data" / "captions" / "coco_val2017_5005.jsonl"

_WORDS = "a dog cat man woman table street car sits on the near with and red blue big of in".split()

HOSTILE = [
    "",
    " ",
    "\n\t",
    ".",
    "'",
    '"',
    "...",
    "--",
    "?!",
    "猫が机の上に座っている。",
    "一只猫坐在桌子上",
    "🐶🐱 dog 🐕 on a 🛋️.",
    "قطة تجلس على الطاولة",
    "Ünïcödé café naïve résumé.",
    "bad \ufffd\ufffd bytes \ufffd.",
    "Mr. Smith met Dr. Who at 3 p.m. in the U.S.A. today. He left.",
    "\"Quoted\" 'single' «guillemets» “curly” ‘quotes’ „low“",
    "I cannot gonna wanna gimme lemme 'tis 'twas more'n d'ye whaddya.",
    "CANNOT GoNnA 'TIS",
    "a\x1cb. \x1c",
    "x.\u00a0y",
    "tab\tsep\nnew line\r\n",
    "(parens) [brackets] {braces} <angles>",
    "em—dash en–dash fig‒dash -- double",
    "e.g. i.e. etc. vs. approx.",
    "3.14 1,000 2023 5-year-old well-known",
    "http://example.com/a?b=c&d=e #tag @user $5 50% a&b; x*y",
    "Hello!!! What?? Ok... Sure.",
    "The dog's bone and the dogs' bones aren't here, y'all.",
    "\u200b zero\u200bwidth \u200d",
    "ǅ titlecase ſ long-s K kelvin İ ı",
    "ＦＵＬＬ ｗｉｄｔｈ",
    "\x00 nul \x7f del",
]


def _long_caption(words: int, seed: int, sentence_len: int | None) -> str:
    rng = random.Random(seed)
    tokens = [rng.choice(_WORDS) for _ in range(words)]
    if sentence_len is None:
        return " ".join(tokens)
    chunks = [" ".join(tokens[i : i + sentence_len]) for i in range(0, words, sentence_len)]
    return ". ".join(chunks) + "."


# Pieces chosen to hit every tokenizer pattern (quotes, contractions, brackets, dashes, sentence ends) and the
# places where stdlib `re` and NLTK's `regex` engine could part (non-ASCII, control and odd whitespace).
_FUZZ_PIECES = [
    *"dog Cat the A man's dogs' can not cannot gon na 'tis 't is wan more'n d'ye Mr. U.S. e.g.".split(),
    *"3.14 1,000 2023 well-known - -- — – . .. ... , : ; ? ! !! ' '' \" ` ``".split(),
    *"( ) [ ] { } < > * & % $ # @".split(),
    *"« » “ ” ‘ ’ „ \ufffd 猫 🐶 ß İ ı ſ K é y'all n't 's 'S 'll 'RE 've 'd 'm x http://a.b/c?d=e".split(),
    "\u00a0",
    "\u2009",
    "\x1c",
]
_FUZZ_SEPS = [" ", " ", " ", "  ", "", "\n", "\t", "\u00a0", ". ", ", "]


@pytest.fixture(scope="module")
def extractor() -> NounExtractor:
    return NounExtractor()


@pytest.fixture(scope="module")
def coco_captions() -> list[str]:
    with COCO_CAPTIONS.open(encoding="utf-8") as f:
        captions = [json.loads(line)["caption"] for line in f]
    assert len(captions) == 5005
    return captions


def test_production_matches_reference_on_all_coco_captions(extractor, coco_captions):
    fast = [extractor.nouns(c) for c in coco_captions]
    ref = [reference_nouns(c) for c in coco_captions]
    mismatches = [(c, r, f) for c, r, f in zip(coco_captions, ref, fast, strict=True) if r != f]
    assert mismatches == []
    assert sum(map(len, ref)) > 15_000  # ~3.4 nouns per COCO caption: the comparison is not vacuous
    # A second pass answers from the sentence memo and must not drift.
    assert [extractor.nouns(c) for c in coco_captions[:500]] == ref[:500]


@pytest.mark.parametrize("caption", HOSTILE, ids=[f"h{i}" for i in range(len(HOSTILE))])
def test_production_matches_reference_on_hostile_strings(extractor, caption):
    assert extractor.nouns(caption) == reference_nouns(caption)


def test_production_matches_reference_on_a_10k_word_caption(extractor):
    """Both read the first MAX_CAPTION_CHARS characters of it (the rule's bound), and agree there."""
    from curation.records import MAX_CAPTION_CHARS

    caption = _long_caption(10_000, seed=1, sentence_len=12)
    nouns = extractor.nouns(caption)
    assert nouns == reference_nouns(caption) == reference_nouns(caption[:MAX_CAPTION_CHARS])
    assert len(caption) > 10 * MAX_CAPTION_CHARS and len(nouns) > 300


def test_production_matches_reference_on_fuzzed_strings(extractor):
    rng = random.Random(20231002)
    captions = []
    for _ in range(600):
        parts = [rng.choice(_FUZZ_PIECES) + rng.choice(_FUZZ_SEPS) for _ in range(rng.randint(1, 25))]
        captions.append("".join(parts).strip() if rng.random() < 0.5 else "".join(parts))
    assert [extractor.nouns(c) for c in captions] == [reference_nouns(c) for c in captions]


def test_decode_caption_reports_invalid_utf8():
    assert decode_caption("café 🐶".encode()) == ("café 🐶", False)
    assert decode_caption(b"caf\xe9 \xff dog") == ("caf\ufffd \ufffd dog", True)
    assert decode_caption(b"") == ("", False)


def test_hostile_inputs_are_counted_never_raised(extractor):
    invalid, was_invalid = decode_caption(b"a red \xff\xfe car \xc3")
    assert was_invalid
    captions = [None, "", "   \n", *HOSTILE[9:], invalid, _long_caption(10_000, seed=2, sentence_len=None)]
    stats = count_captions(captions, extractor=extractor, on_error="raise")
    assert stats.images == len(captions)
    assert stats.errors == 0
    assert stats.empty == 3
    assert sum(stats.nouns_per_image.values()) == stats.images
    assert sum(stats.noun_counts.values()) == stats.total_nouns
    assert stats.noun_counts["car"] >= 1


def test_a_caption_that_fails_is_recorded_or_raised_by_policy(extractor):
    not_text = b"a dog on a bed"  # bytes reach NLTK, which raises TypeError
    stats = count_captions(["A dog and a cat.", not_text], extractor=extractor)  # type: ignore[list-item]
    assert (stats.images, stats.errors, stats.total_nouns) == (1, 1, 2)
    with pytest.raises(TypeError):
        count_captions([not_text], extractor=extractor, on_error="raise")  # type: ignore[list-item]


def test_partials_split_anywhere_merge_to_the_single_pass(extractor, coco_captions):
    captions: list[str | None] = [*coco_captions[:1200], None, "", *HOSTILE[9:14]]
    random.Random(7).shuffle(captions)
    whole = count_captions(captions, extractor=extractor)

    cuts = sorted(random.Random(3).sample(range(1, len(captions)), 6))
    bounds = [0, *cuts, len(captions)]
    parts = [count_captions(captions[a:b], extractor=extractor) for a, b in pairwise(bounds)]
    before = [p.to_json() for p in parts]

    merged = parts[0]
    for part in parts[1:]:
        merged = merged + part
    assert merged == whole
    assert [p.to_json() for p in parts] == before  # `+` leaves its operands alone

    reduced = NounStats()
    for part in reversed(parts):  # order of the reduce does not matter
        reduced += part
    assert reduced == whole
    assert sum(parts, NounStats()) == whole
    shipped = NounStats.from_json(json.loads(json.dumps(parts[0].to_json())))  # as a shard partial travels
    assert shipped.merge(parts[1]) == parts[0] + parts[1]


def test_json_round_trip_is_exact(extractor, coco_captions):
    stats = count_captions([*coco_captions[:300], None, "猫 🐶 dog."], extractor=extractor)
    text = json.dumps(stats.to_json())
    back = NounStats.from_json(json.loads(text))
    assert back == stats
    assert isinstance(next(iter(back.nouns_per_image)), int)
    assert json.dumps(back.to_json()) == text  # deterministic serialization


def test_table1_row_on_hand_checked_captions(extractor):
    # Tagged by the shipped tagger as: dog/NN cat/NN; dog/NN bed/NN; car/NN (no ambiguous words).
    captions = ["A dog and a cat."] * 11 + ["The dog sleeps on the bed.", "A red car.", None, "", "  "]
    stats = count_captions(captions, extractor=extractor)
    assert stats.noun_counts == Counter({"dog": 12, "cat": 11, "bed": 1, "car": 1})
    assert stats.nouns_per_image == Counter({2: 12, 1: 1, 0: 3})
    assert (stats.images, stats.total_nouns, stats.empty, stats.errors) == (16, 25, 3, 0)

    assert stats.table1_row("hand") == {
        "name": "hand",
        "images": 16,
        "vn": 2,  # dog (12) and cat (11) appear MORE than 10 times
        "dn": 4,
        "vn_dn_pct": 50.0,
        "total_nouns": 25,
        "nouns_per_image": 25 / 16,
    }
    strict = stats.table1_row("hand", valid_threshold=11)  # 11 occurrences is not more than 11
    assert (strict["vn"], strict["vn_dn_pct"]) == (1, 25.0)


def test_table1_row_of_nothing_is_zeros():
    assert NounStats().table1_row("none") == {
        "name": "none",
        "images": 0,
        "vn": 0,
        "dn": 0,
        "vn_dn_pct": 0.0,
        "total_nouns": 0,
        "nouns_per_image": 0.0,
    }


def test_noun_spans_mark_exactly_the_reference_nouns(coco_captions):
    """What `curation browse` highlights: the spans' text is the rule's nouns, in order, on real and hostile text."""
    from curation.stats.nouns import noun_spans

    for caption in [*coco_captions[:500], 'A cat <script>alert(1)</script> & "a dog\'s bone".', "  ", "Üñí café."]:
        spans = noun_spans(caption)
        assert [caption[a:b].lower() for a, b in spans] == reference_nouns(caption), caption
        assert all(b1 <= a2 for (_, b1), (a2, _) in pairwise(spans))  # in order, never overlapping
