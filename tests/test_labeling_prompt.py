"""The SICSRec §3.3.1 prompt: exact text, candidates, eligibility, no leakage, chat templates."""
from __future__ import annotations

import pytest

from llm_labeling.prompt import build_prompt, build_prompts, clean_title, render_chat, select_candidates
from shards.prepared import Item, PreparedDataset, UserSequence

TITLES = {1: "Mapo tofu at home", 2: "Spicy hotpot challenge", 3: "Street food  in\nChengdu", 4: "Spicy noodles recipe",
          5: "Dumplings 101", 6: "Secret valid item", 7: "Secret test item"}


def dataset(users: list[UserSequence]) -> PreparedDataset:
    return PreparedDataset([Item(i, f"orig-{i}", t, None) for i, t in TITLES.items()], users)


ALICE = UserSequence(1, "alice", train=[2, 3, 2, 5, 4], valid=6, test=7)

EXPECTED = (
    "<Instruction>: You are a video similarity evaluation assistant. I will provide you with a target video title "
    "and a list of candidate video titles. Please help me find the most similar video title from the candidate "
    "list to the target video.\n"
    "<Input>: The target video is 4-Spicy noodles recipe, and the candidate videos are: 3-Street food in Chengdu, "
    "2-Spicy hotpot challenge, 5-Dumplings 101.\n"
    "<Output Guidance>: Please find the most similar video title from the candidates and output the corresponding "
    "item-ID pair in the following format: 4-<similar_itemID>. If there are no similar videos, output (-1,-1) "
    "directly. Please ensure the format is correct; any other format will be considered invalid."
)


def test_prompt_matches_the_papers_template():
    prompt = build_prompt(ALICE, dataset([ALICE]).titles())
    assert prompt.text == EXPECTED
    assert prompt.user == 1 and prompt.target == 4
    # each candidate's id and title come from the same record, in interaction order, the repeat of 2 once
    assert prompt.candidates == (3, 2, 5)
    assert prompt.candidate_titles == ("Street food in Chengdu", "Spicy hotpot challenge", "Dumplings 101")


def test_no_leakage_of_valid_or_test_items():
    prompt = build_prompt(ALICE, dataset([ALICE]).titles())
    assert "Secret" not in prompt.text
    assert {6, 7}.isdisjoint(prompt.candidates) and prompt.target == ALICE.train[-1]


def test_candidate_cap_keeps_the_most_recent_and_titles_are_cut():
    assert select_candidates([1, 2, 3, 1, 5, 4], 2) == [1, 5]
    assert select_candidates([1, 2, 3, 1, 5, 4], 10) == [2, 3, 1, 5]
    assert select_candidates([4, 1, 4], 10) == [1]  # the target itself is never a candidate
    prompt = build_prompt(ALICE, dataset([ALICE]).titles(), max_candidates=2, max_title_chars=6)
    assert prompt.candidates == (2, 5)
    assert "The target video is 4-Spicy, and the candidate videos are: 2-Spicy, 5-Dumpli." in prompt.text
    assert clean_title("  a\tb \n c ", 0) == "a b c"


def test_item_noun_is_configurable():
    text = build_prompt(ALICE, dataset([ALICE]).titles(), noun="movie").text
    assert text.startswith("<Instruction>: You are a movie similarity evaluation assistant.")
    assert "video" not in text and "If there are no similar movies, output (-1,-1)" in text


def test_ineligible_users_are_counted():
    users = [ALICE,
             UserSequence(2, "short", train=[3], valid=4, test=5),
             UserSequence(3, "repeat", train=[5, 5, 5], valid=1, test=2),
             UserSequence(4, "bob", train=[1, 3], valid=2, test=4)]
    prompts, skipped = build_prompts(dataset(users), users)
    assert [p.user for p in prompts] == [1, 4]
    assert skipped == {"short_history": 1, "no_other_item": 1}
    assert prompts[1].target == 3 and prompts[1].candidates == (1,)


def test_bad_input_is_a_clear_error():
    users = [UserSequence(1, "u", train=[1, 99], valid=2, test=3)]
    with pytest.raises(ValueError, match="outside 1..7"):
        build_prompts(dataset(users), users)
    with pytest.raises(ValueError, match="max_candidates"):
        build_prompts(dataset([ALICE]), [ALICE], max_candidates=0)


def test_chat_template_wraps_the_prompt_as_one_user_turn():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>")
    assert render_chat(tokenizer, "hello") == "hello"  # no template: the plain prompt
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert render_chat(tokenizer, "hello") == "<|user|>hello<|end|><|assistant|>"
