"""The sample-construction prompt of SICSRec §3.3.1.

Target: the user's last *training* item (`UserSequence.train[-1]`); the validation and test items
never reach labeling. Candidates: the same user's earlier training items, each written as
`<id>-<title>` from one item record. Ids in the prompt are the dense item ids (1..N): they are
plain integers, so `<target>-<similar>` answers parse unambiguously (original item ids may contain
'-'), and the parsed ids are the system's own ids with no mapping back.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from shards.prepared import PreparedDataset, UserSequence

NONE_ANSWER = "(-1,-1)"

TEMPLATE = (
    "<Instruction>: You are a {noun} similarity evaluation assistant. I will provide you with a target "
    "{noun} title and a list of candidate {noun} titles. Please help me find the most similar {noun} title "
    "from the candidate list to the target {noun}.\n"
    "<Input>: The target {noun} is {target_id}-{target_title}, and the candidate {noun}s are: {candidates}.\n"
    "<Output Guidance>: Please find the most similar {noun} title from the candidates and output the "
    "corresponding item-ID pair in the following format: {target_id}-<similar_itemID>. If there are no "
    "similar {noun}s, output (-1,-1) directly. Please ensure the format is correct; any other format will be "
    "considered invalid."
)


@dataclass(frozen=True)
class Prompt:
    user: int  # dense user id
    target: int  # dense item id of the target (the last training item)
    target_title: str
    candidates: tuple[int, ...]  # dense item ids, oldest first, distinct, never the target
    candidate_titles: tuple[str, ...]
    text: str  # the rendered prompt (the user message; chat templates are applied by the backend)


def clean_title(title: str, max_chars: int) -> str:
    """One line (newlines would break the template), at most `max_chars` characters."""
    title = " ".join(title.split())
    return title[:max_chars].rstrip() if max_chars > 0 else title


def select_candidates(train: list[int], max_candidates: int) -> list[int]:
    """The distinct earlier training items other than the target, the most recent `max_candidates`
    kept, in interaction order (oldest first)."""
    target, chosen = train[-1], []
    for item in reversed(train[:-1]):
        if len(chosen) == max_candidates:
            break
        if item != target and item not in chosen:
            chosen.append(item)
    return chosen[::-1]


def render(target: int, target_title: str, candidates: list[int], candidate_titles: list[str],
           noun: str = "video") -> str:
    listed = ", ".join(f"{item}-{title}" for item, title in zip(candidates, candidate_titles))
    return TEMPLATE.format(noun=noun, target_id=target, target_title=target_title, candidates=listed)


def build_prompt(user: UserSequence, titles: list[str], max_candidates: int = 20, max_title_chars: int = 80,
                 noun: str = "video") -> Prompt | None:
    """The prompt of one user, or None when the user is not eligible (see `ineligibility`)."""
    if ineligibility(user, max_candidates) is not None:
        return None
    target = user.train[-1]
    candidates = select_candidates(user.train, max_candidates)
    target_title = clean_title(titles[target], max_title_chars)
    candidate_titles = [clean_title(titles[c], max_title_chars) for c in candidates]
    text = render(target, target_title, candidates, candidate_titles, noun)
    return Prompt(user.user, target, target_title, tuple(candidates), tuple(candidate_titles), text)


def ineligibility(user: UserSequence, max_candidates: int = 20) -> str | None:
    """Why a user gets no prompt: 'short_history' (fewer than 2 training items) or
    'no_other_item' (every earlier training item is the target itself); None when eligible."""
    if len(user.train) < 2:
        return "short_history"
    if not select_candidates(user.train, max(1, max_candidates)):
        return "no_other_item"
    return None


def build_prompts(dataset: PreparedDataset, users: list[UserSequence], max_candidates: int = 20,
                  max_title_chars: int = 80, noun: str = "video") -> tuple[list[Prompt], Counter]:
    """Prompts of the eligible users among `users` (in order) and the count of ineligible ones by reason."""
    if max_candidates < 1:
        raise ValueError(f"label.max_candidates must be >= 1, got {max_candidates}")
    titles = dataset.titles()
    prompts, skipped = [], Counter()
    for user in users:
        bad = [i for i in user.train if not 1 <= i <= dataset.num_items]
        if bad:
            raise ValueError(f"user {user.user_id!r} has item ids outside 1..{dataset.num_items}: {bad[:5]}")
        reason = ineligibility(user, max_candidates)
        if reason:
            skipped[reason] += 1
        else:
            prompts.append(build_prompt(user, titles, max_candidates, max_title_chars, noun))
    return prompts, skipped


def render_chat(tokenizer, text: str) -> str:
    """Wrap the prompt in the model's chat template as one user turn, when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text

