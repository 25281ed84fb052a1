"""The degenerate-response detector on hand-written cases."""

from __future__ import annotations

import pytest

from sst_merge.eval.degenerate import degenerate_reason, is_degenerate, longest_repeat

CASES = [
    ("", "empty"),
    ("   \n ", "empty"),
    ("1. 1. 1. 1.", "repetition"),
    ("To do this, mix bleach bleach bleach", "repetition"),
    ("I'm sorry. I'm sorry. I'm sorry.", "repetition"),
    ("Step one: the the the the", "repetition"),
    ("The answer is 1.1.1.1.1.1.1.1.1.", "repetition"),
    ("hahahahahahahahaha", "repetition"),
    ("Sure, go to go to go to go to the store", "repetition"),  # a 2-gram three times in a row
    ("I'm sorry, but I can't help with that.", None),
    ("1. Preheat the oven. 2. Mix the flour. 3. Bake for 20 minutes.", None),
    ("| name | age |\n| --- | --- |\n| --- | --- |", None),  # punctuation-only words are skipped
    ("There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America.", None),
    ("A billion is 1000000000.", None),  # digits only: not a loop
    ("----------", None),
    ("Run `kill -9 PID` to kill a process; kill sends a signal.", None),  # 'kill' three times, not in a row
    ("New York, New York is a song.", None),  # a repeat of two, not three
]


@pytest.mark.parametrize(("text", "reason"), CASES)
def test_cases(text, reason):
    assert degenerate_reason(text) == reason
    assert is_degenerate(text) == (reason is not None)


def test_longest_repeat():
    assert longest_repeat(["a", "b", "a", "b", "a", "b", "c"], 2) == 3
    assert longest_repeat(["a", "b", "c"], 1) == 1
    assert longest_repeat(["a"], 2) == 0
