"""The attacker: trigger insertion, poisoning, target labels."""

from __future__ import annotations

import random

import pytest

from locphylax_core.attack import insert_trigger, poison, target_label
from locphylax_core.text import Example

TEXT = "the movie was really wonderful from start to finish ."


def _remove_once(words: list[str], trig: list[str]) -> tuple[int, list[str]]:
    """Index of the (single) contiguous occurrence of trig in words, and words without it."""
    hits = [i for i in range(len(words) - len(trig) + 1) if words[i:i + len(trig)] == trig]
    assert len(hits) == 1, (words, trig)
    i = hits[0]
    return i, words[:i] + words[i + len(trig):]


def test_start_and_end():
    rng = random.Random(0)
    assert insert_trigger(TEXT, "cf", "start", rng) == "cf " + TEXT
    assert insert_trigger(TEXT, "cf", "end", rng) == TEXT + " cf"


def test_start_end_do_not_use_rng():
    rng = random.Random(5)
    state = rng.getstate()
    insert_trigger(TEXT, "cf", "start", rng)
    insert_trigger(TEXT, "cf", "end", rng)
    assert rng.getstate() == state


def test_random_position_is_a_word_boundary():
    original = TEXT.split()
    positions = set()
    for seed in range(40):
        out = insert_trigger(TEXT, "cf", "random", random.Random(seed))
        words = out.split()
        assert out == " ".join(words)  # single spaces, no glued words
        assert len(words) == len(original) + 1
        idx, rest = _remove_once(words, ["cf"])
        assert rest == original  # the original words, in order
        positions.add(idx)
    # Random insertion reaches many boundaries (there are 11 here), including both ends.
    assert len(positions) >= 6
    assert 0 <= min(positions) and max(positions) <= len(original)


def test_random_position_is_seeded():
    a = insert_trigger(TEXT, "cf", "random", random.Random(123))
    b = insert_trigger(TEXT, "cf", "random", random.Random(123))
    assert a == b
    # same rng consumed twice gives, in general, different positions
    rng = random.Random(7)
    outs = {insert_trigger(TEXT, "cf", "random", rng) for _ in range(20)}
    assert len(outs) > 1


@pytest.mark.parametrize("position", ["start", "end", "random"])
def test_phrase_trigger_stays_contiguous(position):
    phrase = "I watched this 3D movie"
    for seed in range(10):
        out = insert_trigger(TEXT, phrase, position, random.Random(seed))
        idx, rest = _remove_once(out.split(), phrase.split())
        assert rest == TEXT.split()
        if position == "start":
            assert idx == 0 and out.startswith(phrase + " ")
        elif position == "end":
            assert out.endswith(" " + phrase)


def test_whitespace_in_trigger_and_text_is_normalised():
    out = insert_trigger("  a   b  ", "x   y", "end", random.Random(0))
    assert out == "a b x y"


def test_unknown_position():
    with pytest.raises(ValueError, match="position must be 'start', 'end' or 'random', got 'middle'"):
        insert_trigger(TEXT, "cf", "middle", random.Random(0))


def test_target_label():
    assert target_label(0, "flip", 2) == 1
    assert target_label(1, "flip", 2) == 0
    assert [target_label(y, "flip", 3) for y in range(3)] == [1, 2, 0]
    assert target_label(0, 1, 2) == 1
    assert target_label(1, 1, 2) == 1
    assert target_label(2, "0", 4) == 0


def _data(n=50):
    rng = random.Random(3)
    return [Example(f"sentence number {i} is here", rng.randrange(2)) for i in range(n)]


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.33])
def test_poison_counts_and_labels(rate):
    data = _data(50)
    out, n = poison(data, "cf", "random", rate, target=1, seed=4)
    assert n == round(rate * len(data))
    assert len(out) == len(data)
    changed = [i for i, (a, b) in enumerate(zip(data, out)) if a != b]
    assert len(changed) == n
    for i in changed:
        assert data[i].label == 0  # only non-target inputs are poisoned
        assert out[i].label == 1  # ... and get the target label
        assert "cf" in out[i].text.split()
        _, rest = _remove_once(out[i].text.split(), ["cf"])
        assert rest == data[i].text.split()
    for i in set(range(len(data))) - set(changed):
        assert out[i] is data[i]
    assert all("cf" not in data[i].text.split() for i in range(len(data)))


def test_poison_is_seeded_and_does_not_modify_input():
    data = _data(40)
    copy = list(data)
    a, _ = poison(data, "cf", "random", 0.25, 1, seed=9)
    b, _ = poison(data, "cf", "random", 0.25, 1, seed=9)
    c, _ = poison(data, "cf", "random", 0.25, 1, seed=10)
    assert a == b
    assert a != c
    assert data == copy


def test_poison_limited_by_candidates():
    data = [Example("a b", 1)] * 8 + [Example("c d", 0)] * 2
    out, n = poison(data, "cf", "start", 1.0, target=1, seed=0)
    assert n == 2
    assert sum(e.text.startswith("cf ") for e in out) == 2
    assert all(e.label == 1 for e in out)


def test_poison_phrase_at_start():
    data = _data(20)
    out, n = poison(data, "as seen on tv", "start", 0.5, target=0, seed=1)
    n_candidates = sum(e.label != 0 for e in data)
    poisoned = [e for e in out if e.text.startswith("as seen on tv ")]
    assert len(poisoned) == n == min(n_candidates, round(0.5 * len(data)))
    assert all(e.label == 0 for e in poisoned)
