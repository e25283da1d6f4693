"""caption_status on hand-written captions."""

from __future__ import annotations

import pytest

from curation.caption.quality import STATUSES, caption_status, has_ngram_loop, has_tail_loop

GOOD = (
    "The image shows a brown dog sitting on a wooden bench in a park. The dog looks at the camera, "
    "and the style is a realistic photograph with natural light."
)


def status(text: str, n: int = 20, max_new: int = 128, eos: bool = True) -> str:
    return caption_status(text, n, max_new, eos)


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "...", " ,;- "])
def test_empty(text: str) -> None:
    assert status(text) == "empty"
    assert status(text, n=128, eos=False) == "empty"  # empty beats truncated


def test_ok_and_truncated() -> None:
    assert status(GOOD) == "ok"
    assert status(GOOD, n=128, max_new=128, eos=False) == "truncated"
    assert status(GOOD, n=127, max_new=128, eos=True) == "ok"
    assert status(GOOD, n=128, max_new=128, eos=True) == "ok"  # EOS as the last allowed token
    assert status(GOOD, n=50, max_new=128, eos=False) == "ok"  # stopped early for another reason


@pytest.mark.parametrize(
    "text",
    [
        "a cat cat cat cat on a mat",  # unigram x4
        "There is a red car, red car, red car, red car parked outside.",  # bigram x4, punctuation ignored
        "The photo shows the sky is blue the sky is blue the sky is blue the sky is blue",  # 4-gram x4
        "A DOG and a dog AND A Dog and a dog and",  # case-insensitive
        GOOD + " in the park near the lake" * 3,  # 6-word tail x3
        GOOD + " by the river with trees" * 3 + " by the river",  # cut mid-loop: still periodic
    ],
)
def test_repetitive(text: str) -> None:
    assert status(text) == "repetitive"
    assert status(text, n=128, max_new=128, eos=False) == "repetitive"  # repetitive beats truncated


@pytest.mark.parametrize(
    "text",
    [
        "a cat cat cat on a mat",  # only 3 copies
        "very very very good",
        "red car red car red car and a blue car",  # 3 bigram copies
        GOOD + " in the park near the lake in the park near the lake",  # long phrase only twice at the end
        "1 2 3 4 5 6 7 8 9 10",
        "the dog and the cat and the bird and the fish and the cow",  # "and the" recurs, never back to back
    ],
)
def test_not_repetitive(text: str) -> None:
    assert status(text) == "ok"


def test_loop_helpers_and_statuses() -> None:
    assert has_ngram_loop("a b a b a b a b".split())
    assert not has_ngram_loop("a b a b a b a".split())
    assert has_ngram_loop("x y z w x y z w x y z w x y z w".split())
    # a 5-gram loop is the tail rule's job
    assert not has_ngram_loop("v x y z w v x y z w v x y z w v x y z w".split())
    assert has_tail_loop("v x y z w v x y z w v x y z w".split())
    assert not has_tail_loop("v x y z w v x y z w v x y z w end".split())
    assert set(STATUSES) == {"ok", "empty", "truncated", "repetitive"}
