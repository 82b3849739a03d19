"""Parse and validate the LLM's answer `<target_id>-<similar_id>` or `(-1,-1)`.

Every answer gets exactly one outcome:
  valid          `<target>-<similar>` with the right target and a similar id among the candidates
  none           `(-1,-1)`: the LLM found no similar item
  malformed      anything else
  wrong_target   a well-formed pair whose first id is not the prompt's target
  not_candidate  a well-formed pair whose second id is not a candidate (the target itself never is one)
"""
from __future__ import annotations

import re

from llm_labeling.prompt import NONE_ANSWER, Prompt

OUTCOMES = ("valid", "none", "malformed", "not_candidate", "wrong_target")

_PAIR = re.compile(r"(\d+)\s*-\s*(\d+)")
_NONE = re.compile(r"-1\s*,\s*-1")
# Decoration small models put around an otherwise correct answer: quotes, markdown, brackets, a full stop.
_DECORATION = " \t`*\"'.()[]"


def allowed_answers(prompt: Prompt) -> list[str]:
    """Every answer the parser accepts as valid or none: the choices for guided decoding."""
    return [f"{prompt.target}-{c}" for c in prompt.candidates] + [NONE_ANSWER]


def parse_answer(answer: str, prompt: Prompt) -> tuple[str, int]:
    """(outcome, similar item id); the id is -1 unless the outcome is 'valid'."""
    lines = [line for line in answer.strip().splitlines() if line.strip()]
    text = lines[0].strip(_DECORATION) if lines else ""
    if _NONE.fullmatch(text):
        return "none", -1
    pair = _PAIR.fullmatch(text)
    if not pair:
        return "malformed", -1
    target, similar = int(pair.group(1)), int(pair.group(2))
    if target != prompt.target:
        return "wrong_target", -1
    if similar not in prompt.candidates:
        return "not_candidate", -1
    return "valid", similar
