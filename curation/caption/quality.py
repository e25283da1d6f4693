"""Caption status: a cheap, pure check of a generated caption, so bad captions are counted, not hidden.

Statuses, by precedence (the first that applies wins):
- "empty": no letter or digit at all.
- "repetitive": the decoder looped. Over lower-cased words (runs of letters/digits, punctuation ignored):
  (a) some n-gram, n in 1..4, occurs MIN_REPEATS (4) times back to back anywhere ("a b a b a b a b"), or
  (b) the tail is a loop of a longer phrase: the last 3p words have period p for some p in 5..MAX_TAIL_PERIOD,
      i.e. a phrase of >= 5 words repeated 3 times at the end (greedy decoding's typical failure).
- "truncated": generation stopped at max_new_tokens without emitting EOS.
- "ok".
"""

from __future__ import annotations

import re

STATUSES = ("ok", "empty", "truncated", "repetitive")
MIN_REPEATS = 4  # back-to-back copies of a short n-gram that count as a loop
MAX_NGRAM = 4
TAIL_REPEATS = 3  # copies of a long phrase at the end that count as a loop
MAX_TAIL_PERIOD = 40  # words
_WORD = re.compile(r"[^\W_]+")


def caption_status(text: str, n_new_tokens: int, max_new_tokens: int, hit_eos: bool) -> str:
    """Classify one caption as "ok" | "empty" | "truncated" | "repetitive" (rules in the module docstring)."""
    words = _WORD.findall(text.lower())
    if not words:
        return "empty"
    if has_ngram_loop(words) or has_tail_loop(words):
        return "repetitive"
    if not hit_eos and n_new_tokens >= max_new_tokens:
        return "truncated"
    return "ok"


def has_ngram_loop(words: list[str], max_n: int = MAX_NGRAM, repeats: int = MIN_REPEATS) -> bool:
    """True when some n-gram (n <= max_n) occurs `repeats` times consecutively."""
    for n in range(1, max_n + 1):
        # run counts consecutive positions i where words[i] == words[i + n]; a run of n*(repeats-1) of them
        # means the n-gram starting there is copied `repeats` times.
        run = 0
        for i in range(len(words) - n):
            run = run + 1 if words[i] == words[i + n] else 0
            if run >= n * (repeats - 1):
                return True
    return False


def has_tail_loop(
    words: list[str],
    min_period: int = MAX_NGRAM + 1,
    max_period: int = MAX_TAIL_PERIOD,
    repeats: int = TAIL_REPEATS,
) -> bool:
    """True when the last repeats*p words are periodic with period p, for some p in min_period..max_period."""
    for p in range(min_period, min(max_period, len(words) // repeats) + 1):
        tail = words[-repeats * p :]
        if all(tail[i] == tail[i + p] for i in range(len(tail) - p)):
            return True
    return False
