"""Noun statistics of captions: the concept-density measure of PixArt-alpha's Table 1.

Noun rule (as in the paper, with NLTK): split the caption into sentences with punkt_tab
(``nltk.sent_tokenize``); tokenize each sentence with ``nltk.word_tokenize`` and tag it with
``nltk.pos_tag`` (the averaged-perceptron English tagger); a token is a noun when its tag is NN, NNS,
NNP or NNPS, and it is counted on its lower-cased word. A caption is read up to its first
``MAX_CAPTION_CHARS`` (4,096) characters, by both paths, so a pathological caption costs what an ordinary
one does. DN is the number of distinct nouns, VN the
number of distinct nouns seen more than ``valid_threshold`` (10) times, and the average is nouns per image.

``reference_nouns`` is that rule written plainly and kept as the oracle. ``NounExtractor`` is the
production path, ~4-5x faster: the same tokenizer patterns and tagger weights, minus work that cannot
change the answer (regex passes whose required characters are absent; the stdlib ``re`` engine on
printable ASCII; the tagger's per-label dict scoring done as one float64 row sum in the same order),
with results memoized per sentence and per tagger context. Tests hold it to identical nouns on all
5,005 COCO captions, hostile strings and fuzzed text.

Counting is map-then-reduce: ``NounStats`` is a per-shard partial that merges exactly and
round-trips through JSON, so shards can be counted anywhere and reduced once.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import nltk
import numpy as np
import regex
from nltk.tag.perceptron import PerceptronTagger
from nltk.tokenize.destructive import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktLanguageVars, PunktTokenizer

from curation.records import MAX_CAPTION_CHARS

NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
VALID_THRESHOLD = 10  # the paper's "valid distinct nouns appear more than 10 times"


def reference_nouns(caption: str) -> list[str]:
    """Nouns of ``caption`` by the paper's rule, through NLTK's public functions only (the oracle)."""
    nouns: list[str] = []
    for sentence in nltk.sent_tokenize(caption[:MAX_CAPTION_CHARS]):
        for word, tag in nltk.pos_tag(nltk.word_tokenize(sentence)):
            if tag in NOUN_TAGS:
                nouns.append(word.lower())
    return nouns


def noun_spans(caption: str) -> list[tuple[int, int]]:
    """(start, end) in ``caption`` of each token that ``reference_nouns`` counts, to highlight them.

    Tokens are found in the text in order; the few that ``word_tokenize`` rewrites (quotes) are not nouns and are
    passed over.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for sentence in nltk.sent_tokenize(caption):
        for word, tag in nltk.pos_tag(nltk.word_tokenize(sentence)):
            at = caption.find(word, cursor)
            if at < 0:
                continue
            cursor = at + len(word)
            if tag in NOUN_TAGS:
                spans.append((at, cursor))
    return spans


# Characters a tokenizer pattern needs in the text to match at all; a pass whose needs are absent is a
# no-op and is skipped. Keyed by pattern source so a pattern NLTK changes or adds runs unguarded (slower,
# never different). Only non-letter literals appear here, so case-insensitive flags cannot matter.
_NEEDS: dict[str, tuple[str, ...]] = {
    "([«“‘„]|[`]+)": ("«", "“", "‘", "„", "`"),
    r"^\"": ('"',),
    r"(``)": ("``",),
    r"([ \(\[{<])(\"|\'{2})": ('"', "''"),
    r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)": ("'",),
    r"([»”’])": ("»", "”", "’"),
    r"''": ("''",),
    r'"': ('"',),
    r"([^' ])('[sS]|'[mM]|'[dD]|') ": ("'",),
    r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ": ("'",),
    r'([^\.])(\.)([\]\)}>"\'' "»”’ " r"]*+)\s*$": (".",),
    r"([:,])([^\d])": (":", ","),
    r"([:,])$": (":", ","),
    r"\.{2,}": ("..",),
    r"[;@#$%&]": (";", "@", "#", "$", "%", "&"),
    r"[\u2012-\u2015]": ("\u2012", "\u2013", "\u2014", "\u2015"),
    r'([^\.])(\.)([\]\)}>"\']*)\s*$': (".",),
    r"[?!]": ("?", "!"),
    r"([^'])' ": ("' ",),
    r"[*]": ("*",),
    r"[\]\[\(\)\{\}\<\>]": tuple("[](){}<>"),
    r"--": ("--",),
    r"(?i) ('t)(?#X)(is)\b": ("'",),
    r"(?i) ('t)(?#X)(was)\b": ("'",),
}


_Step = tuple[Any, str, re.Pattern[str] | None]  # (compiled pattern, replacement, guard)


class _GuardedWordTokenizer:
    """``NLTKWordTokenizer.tokenize`` (as ``word_tokenize`` calls it): the same patterns in the same order,
    skipping passes that provably cannot match, and on printable-ASCII text running them with the stdlib
    ``re`` engine, which NLTK's ``regex`` engine agrees with there (no Unicode classes, no newlines,
    no pattern that can match empty) and which is faster."""

    _STDLIB_SAFE_FLAGS = regex.V0 | regex.UNICODE | regex.IGNORECASE

    def __init__(self) -> None:
        tok = NLTKWordTokenizer
        passes = [*tok.STARTING_QUOTES, *tok.PUNCTUATION, tok.PARENS_BRACKETS, tok.DOUBLE_DASHES]
        self._before = self._steps(passes, stdlib=False)
        self._before_ascii = self._steps(passes, stdlib=True)
        self._after = self._steps(tok.ENDING_QUOTES, stdlib=False)
        self._after_ascii = self._steps(tok.ENDING_QUOTES, stdlib=True)
        # The MacIntyre contractions are (already stdlib) letter patterns under (?i); one combined search
        # decides whether any of them can fire, and if one can, all run as in NLTK.
        self._contractions2 = [(rx, r" \1 \2 ") for rx in tok.CONTRACTIONS2]
        self._any_contraction2 = re.compile(
            "(?i)" + "|".join(f"(?:{rx.pattern.removeprefix('(?i)')})" for rx in tok.CONTRACTIONS2)
        )
        self._contractions3 = self._steps([(rx, r" \1 \2 ") for rx in tok.CONTRACTIONS3], stdlib=False)

    @classmethod
    def _steps(cls, pairs: Iterable[tuple[Any, str]], stdlib: bool) -> list[_Step]:
        steps = []
        for rx, sub in pairs:
            if stdlib and not isinstance(rx, re.Pattern) and cls._stdlib_equivalent(rx):
                rx = re.compile(rx.pattern)
            needs = _NEEDS.get(rx.pattern)
            # One C-level search for "any of these substrings" is cheaper than a Python loop of `in`.
            steps.append((rx, sub, re.compile("|".join(map(re.escape, needs))) if needs else None))
        return steps

    @classmethod
    def _stdlib_equivalent(cls, rx: Any) -> bool:
        # Only NLTK's default flags (case-insensitivity only from an inline "(?i)" in the source), so
        # compiling the bare source with ``re`` gives the same pattern.
        if rx.flags & ~cls._STDLIB_SAFE_FLAGS:
            return False
        return not rx.flags & regex.IGNORECASE or rx.pattern.startswith("(?i)")

    @staticmethod
    def _run(text: str, steps: list[_Step]) -> str:
        for rx, sub, needs in steps:
            if needs is None or needs.search(text):
                text = rx.sub(sub, text)
        return text

    def tokenize(self, text: str) -> list[str]:
        # Insertions are ASCII, so printable-ASCII input stays printable ASCII through every pass.
        ascii_only = text.isascii() and text.isprintable()
        text = self._run(text, self._before_ascii if ascii_only else self._before)
        text = self._run(" " + text + " ", self._after_ascii if ascii_only else self._after)
        if self._any_contraction2.search(text):
            for rx, sub in self._contractions2:
                text = rx.sub(sub, text)
        text = self._run(text, self._contractions3)
        return text.split()


class _FastTagger:
    """``PerceptronTagger.tag`` with identical results: each feature's weights are a dense row, and a
    token's scores are the sum of its feature rows taken in the tagger's own feature order, so every
    per-label float sum is the same sequence of additions (absent labels add an exact 0.0). The 14
    feature names never collide (no name plus a space prefixes another), so each feature counts once."""

    def __init__(self, tagger: PerceptronTagger, memo_size: int) -> None:
        self._tagger = tagger
        self._tagdict: dict[str, str] = tagger.tagdict
        # Descending labels: on a score tie NLTK picks the alphabetically last label, and argmax the first.
        self._labels = sorted(tagger.model.classes, reverse=True)
        col = {label: j for j, label in enumerate(self._labels)}
        weights: dict[str, dict[str, float]] = tagger.model.weights
        self._row = {feat: i for i, feat in enumerate(weights)}
        self._w = np.zeros((len(weights), len(self._labels)), dtype=np.float64)
        for i, per_label in enumerate(weights.values()):
            for label, value in per_label.items():
                self._w[i, col[label]] = value
        self._memo: dict[tuple[str, ...], str] = {}
        self._memo_size = memo_size

    def _predict(self, feats: tuple[str, ...]) -> str:
        row = self._row.get
        rows = [i for i in map(row, feats) if i is not None]
        if not rows:
            return self._labels[0]  # every score is 0.0
        # add.reduce over axis 0 of a C-contiguous block adds row after row (no pairwise summation).
        return self._labels[np.add.reduce(self._w.take(rows, axis=0), axis=0).argmax()]

    def tag(self, tokens: list[str]) -> list[str]:
        normalize = self._tagger.normalize
        ctx = ["-START-", "-START2-", *map(normalize, tokens), "-END-", "-END2-"]
        prev, prev2 = "-START-", "-START2-"
        tags = []
        memo = self._memo
        for i, word in enumerate(tokens):
            tag = self._tagdict.get(word)
            if not tag:
                # Everything PerceptronTagger._get_features reads, so the memo key decides the tag.
                w2, w1, w0, n1, n2 = ctx[i : i + 5]
                key = (word[-3:], word[:1], prev, prev2, w2, w1, w0, n1, n2)
                tag = memo.get(key)
                if tag is None:
                    tag = self._predict(
                        (
                            "bias",
                            "i suffix " + word[-3:],
                            "i pref1 " + word[:1],
                            "i-1 tag " + prev,
                            "i-2 tag " + prev2,
                            f"i tag+i-2 tag {prev} {prev2}",
                            "i word " + w0,
                            f"i-1 tag+i word {prev} {w0}",
                            "i-1 word " + w1,
                            "i-1 suffix " + w1[-3:],
                            "i-2 word " + w2,
                            "i+1 word " + n1,
                            "i+1 suffix " + n1[-3:],
                            "i+2 word " + n2,
                        )
                    )
                    if len(memo) >= self._memo_size:
                        memo.clear()  # bounded: a cold restart costs less than an LRU's bookkeeping
                    memo[key] = tag
            tags.append(tag)
            prev2, prev = prev, tag
        return tags


class NounExtractor:
    """Production noun extraction: the same nouns as ``reference_nouns``, several times faster.

    Loads punkt_tab and the tagger once (about 1 s and 40 MB: the tagger weights as a dense matrix).
    Sentences and tagger contexts are memoized because generated captions repeat whole phrases; each
    memo holds at most ``memo_size`` entries and sentences longer than ``memo_max_chars`` are not kept.
    """

    def __init__(self, memo_size: int = 100_000, memo_max_chars: int = 400) -> None:
        self._punkt = PunktTokenizer("english")  # what nltk.sent_tokenize uses
        self._words = _GuardedWordTokenizer()
        self._tagger = _FastTagger(PerceptronTagger(), memo_size)  # what nltk.pos_tag uses
        self._sentences: dict[str, tuple[str, ...]] = {}
        self._memo_size = memo_size
        self._memo_max_chars = memo_max_chars

    def nouns(self, caption: str) -> list[str]:
        """Lower-cased nouns of ``caption`` (its first MAX_CAPTION_CHARS characters) in text order, repeats kept."""
        return [
            noun
            for sentence in self._punkt.tokenize(caption[:MAX_CAPTION_CHARS])
            for noun in self._sentence_nouns(sentence)
        ]

    def _sentence_nouns(self, sentence: str) -> tuple[str, ...]:
        nouns = self._sentences.get(sentence)
        if nouns is None:
            tokens = [tok for part in self._resplit(sentence) for tok in self._words.tokenize(part)]
            tags = self._tagger.tag(tokens)
            nouns = tuple(word.lower() for word, tag in zip(tokens, tags, strict=True) if tag in NOUN_TAGS)
            if len(sentence) <= self._memo_max_chars:
                if len(self._sentences) >= self._memo_size:
                    self._sentences.clear()
                self._sentences[sentence] = nouns
        return nouns

    def _resplit(self, sentence: str) -> list[str]:
        """``word_tokenize`` runs punkt again on each sentence; same result, skipped when it cannot split.

        Punkt (3.10) only breaks at an end character with text after it, and otherwise returns the text
        right-stripped, or nothing if blank; a sentence whose only end character is its last is that case.
        """
        if not any(c in sentence[:-1] for c in PunktLanguageVars.sent_end_chars):
            stripped = sentence.rstrip()
            return [stripped] if stripped else []
        return self._punkt.tokenize(sentence)


@functools.cache
def default_extractor() -> NounExtractor:
    """The per-process extractor, loaded on first use (as NLTK caches its own tagger)."""
    return NounExtractor()


def decode_caption(raw: bytes) -> tuple[str, bool]:
    """Decode caption bytes as UTF-8: ``(text, invalid)``, invalid bytes replaced by U+FFFD."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


OnError = Literal["raise", "record"]


@dataclass(slots=True)
class NounStats:
    """Mergeable noun counts over captions, one caption per image.

    ``images`` counts every caption counted, blank or None ones included (as 0 nouns, also in ``empty``);
    a caption whose extraction raised is counted in ``errors`` only, so ``nouns_per_image`` (a histogram:
    noun count -> images) always sums to ``images``.
    """

    images: int = 0
    total_nouns: int = 0
    noun_counts: Counter[str] = field(default_factory=Counter)
    nouns_per_image: Counter[int] = field(default_factory=Counter)
    empty: int = 0
    errors: int = 0

    def add_nouns(self, nouns: Sequence[str]) -> None:
        """Count one image whose nouns are already extracted."""
        self.images += 1
        self.total_nouns += len(nouns)
        self.noun_counts.update(nouns)
        self.nouns_per_image[len(nouns)] += 1

    def add_caption(
        self, text: str | None, *, extractor: NounExtractor | None = None, on_error: OnError = "record"
    ) -> None:
        """Count one image's caption; with ``on_error="record"`` a caption that fails only adds to errors."""
        if text is None or not text.strip():
            self.empty += 1
            self.add_nouns(())
            return
        try:
            nouns = (extractor or default_extractor()).nouns(text)
        except Exception:
            # e.g. NLTK's regex timeout on a pathological caption: a bad sample must not stop a shard.
            if on_error == "raise":
                raise
            self.errors += 1
            return
        self.add_nouns(nouns)

    def __iadd__(self, other: NounStats) -> NounStats:
        self.images += other.images
        self.total_nouns += other.total_nouns
        self.noun_counts.update(other.noun_counts)
        self.nouns_per_image.update(other.nouns_per_image)
        self.empty += other.empty
        self.errors += other.errors
        return self

    def merge(self, other: NounStats) -> NounStats:
        """A new ``NounStats`` holding both (``a + b`` is the same); ``a += b`` reduces in place."""
        merged = NounStats(
            self.images,
            self.total_nouns,
            Counter(self.noun_counts),
            Counter(self.nouns_per_image),
            self.empty,
            self.errors,
        )
        merged += other
        return merged

    __add__ = merge

    def to_json(self) -> dict[str, Any]:
        """JSON types only (histogram keys become strings); deterministic order, most frequent first."""
        return {
            "images": self.images,
            "total_nouns": self.total_nouns,
            "noun_counts": dict(sorted(self.noun_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            "nouns_per_image": {str(k): v for k, v in sorted(self.nouns_per_image.items())},
            "empty": self.empty,
            "errors": self.errors,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NounStats:
        return cls(
            images=int(d["images"]),
            total_nouns=int(d["total_nouns"]),
            noun_counts=Counter({str(k): int(v) for k, v in d["noun_counts"].items()}),
            nouns_per_image=Counter({int(k): int(v) for k, v in d["nouns_per_image"].items()}),
            empty=int(d["empty"]),
            errors=int(d["errors"]),
        )

    def table1_row(self, name: str, valid_threshold: int = VALID_THRESHOLD) -> dict[str, Any]:
        """A Table 1 row: VN = distinct nouns seen more than ``valid_threshold`` times; DN = distinct."""
        dn = len(self.noun_counts)
        vn = sum(1 for count in self.noun_counts.values() if count > valid_threshold)
        return {
            "name": name,
            "images": self.images,
            "vn": vn,
            "dn": dn,
            "vn_dn_pct": 100.0 * vn / dn if dn else 0.0,
            "total_nouns": self.total_nouns,
            "nouns_per_image": self.total_nouns / self.images if self.images else 0.0,
        }


def count_captions(
    captions: Iterable[str | None], *, extractor: NounExtractor | None = None, on_error: OnError = "record"
) -> NounStats:
    """``NounStats`` of a stream of captions, one per image."""
    stats = NounStats()
    extractor = extractor or default_extractor()
    for caption in captions:
        stats.add_caption(caption, extractor=extractor, on_error=on_error)
    return stats
