"""Parsing and validating `<target>-<similar>` answers; every outcome counted."""
from __future__ import annotations

import pytest

from llm_labeling.parse import OUTCOMES, allowed_answers, parse_answer
from llm_labeling.prompt import Prompt

PROMPT = Prompt(user=1, target=12, target_title="t", candidates=(3, 7, 40), candidate_titles=("a", "b", "c"), text="")


@pytest.mark.parametrize("answer, expected", [
    ("12-7", ("valid", 7)),
    ("  12 - 40\n", ("valid", 40)),
    ("`12-3`.", ("valid", 3)),
    ("**12-7**\nBecause both are about food.", ("valid", 7)),
    ("(-1,-1)", ("none", -1)),
    ("-1, -1", ("none", -1)),
    ("", ("malformed", -1)),
    ("The most similar is 12-7", ("malformed", -1)),
    ("12-7-3", ("malformed", -1)),
    ("twelve-seven", ("malformed", -1)),
    ("12-5", ("not_candidate", -1)),
    ("12-12", ("not_candidate", -1)),  # similar == target is rejected
    ("7-3", ("wrong_target", -1)),
    ("3-12", ("wrong_target", -1)),
])
def test_outcomes(answer, expected):
    assert parse_answer(answer, PROMPT) == expected


def test_allowed_answers_are_exactly_the_valid_ones_plus_none():
    choices = allowed_answers(PROMPT)
    assert choices == ["12-3", "12-7", "12-40", "(-1,-1)"]
    assert [parse_answer(c, PROMPT)[0] for c in choices] == ["valid", "valid", "valid", "none"]
    assert set(OUTCOMES) == {"valid", "none", "malformed", "not_candidate", "wrong_target"}
