"""Engines: the deterministic TF-IDF labeler and transformers `generate` on a tiny local model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llm_labeling.backends import DeterministicEngine, TfidfIndex, TransformersEngine, _local_model, build_engine
from llm_labeling.config import LabelConfig
from llm_labeling.parse import allowed_answers, parse_answer
from llm_labeling.prompt import NONE_ANSWER, Prompt, render

TITLES = ["spicy beef noodles", "beef noodles soup", "chocolate cake", "spicy chicken", "green tea",
          "tea ceremony", "apple pie", "apple pie", "hand pulled noodles", "cake decorating", "apple crumble"]


def make_prompt(user: int, target: int, candidates: list[int], titles: list[str] = TITLES) -> Prompt:
    """Item k has title titles[k - 1]."""
    cand_titles = [titles[c - 1] for c in candidates]
    text = render(target, titles[target - 1], candidates, cand_titles)
    return Prompt(user, target, titles[target - 1], tuple(candidates), tuple(cand_titles), text)


# ---------------------------------------------------------------- deterministic

def test_tfidf_matches_scikit_learn():
    sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
    from sklearn.metrics.pairwise import cosine_similarity

    vectorizer = sklearn_text.TfidfVectorizer(token_pattern=r"(?u)\b\w+\b").fit(TITLES)
    index = TfidfIndex(TITLES)
    pairs = [(0, 1), (0, 3), (0, 8), (2, 9), (4, 5), (6, 7), (0, 2)]
    expected = cosine_similarity(vectorizer.transform([TITLES[a] for a, _ in pairs]),
                                 vectorizer.transform([TITLES[b] for _, b in pairs])).diagonal()
    assert [index.cosine(TITLES[a], TITLES[b]) for a, b in pairs] == pytest.approx(list(expected), abs=1e-12)


def test_tfidf_hand_computed():
    # corpus "a b", "a": idf(a) = ln(3/3) + 1 = 1, idf(b) = ln(3/2) + 1; cos("a b", "a") = 1 / |(1, idf(b))|
    import math
    idf_b = math.log(1.5) + 1
    assert TfidfIndex(["a b", "a"]).cosine("a b", "a") == pytest.approx(1 / math.sqrt(1 + idf_b ** 2))


def test_deterministic_picks_most_similar_ties_to_most_recent_none_when_unrelated():
    engine = DeterministicEngine(TITLES)
    prompts = [
        make_prompt(1, 1, [3, 2, 4, 5]),  # "spicy beef noodles": "beef noodles soup" (2 words) beats "spicy chicken"
        make_prompt(2, 3, [7, 10, 8]),  # "chocolate cake": only "cake decorating" overlaps
        make_prompt(3, 10, [7, 8, 5]),  # "cake decorating": no overlap with any candidate
        make_prompt(4, 11, [8, 3, 7]),  # "apple crumble": 7 and 8 are both "apple pie", a tie: the most recent
        make_prompt(5, 11, [7, 3, 8]),
    ]
    assert [a.text for a in engine.generate(prompts)] == ["1-2", "3-10", NONE_ANSWER, "11-7", "11-8"]
    assert all(a.tokens == 0 for a in engine.generate(prompts))


# ---------------------------------------------------------------- model paths

def test_local_model_paths(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert _local_model(str(gguf)) == (tmp_path, {"gguf_file": "m.gguf"})
    assert _local_model(str(tmp_path)) == (tmp_path, {})
    with pytest.raises(ValueError, match="model_path is empty"):
        _local_model("")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _local_model(str(tmp_path / "missing"))
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        _local_model(str(tmp_path / "w.bin"))
    with pytest.raises(ValueError, match="unknown label.backend"):
        build_engine(LabelConfig(backend="openai"), [])


def test_cpu_paths_never_import_vllm():
    code = ("import sys, llm_labeling.run, llm_labeling.backends as b; "
            "b.build_engine(llm_labeling.run.LabelConfig(), ['x']); assert 'vllm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------- transformers on a tiny random model

def build_tiny_model(folder: Path, titles: list[str], chat_template: str | None = None,
                     init_range: float = 0.5) -> Path:
    """A 2-layer GPT-2 with random weights and a byte-level BPE trained here on the prompt vocabulary.
    A wide `init_range` gives peaked logits, so greedy answers differ between prompts and are stable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = titles + [render(12, titles[0], [3, 4], titles[1:3])] + [f"{i}-{j}" for i in range(30) for j in range(30)]
    raw.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=128, n_layer=2, n_head=2,
                        initializer_range=init_range,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    import torch
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), TITLES)


PROMPTS = [make_prompt(1, 1, [3, 2, 4, 5]), make_prompt(2, 3, [7, 10]), make_prompt(3, 10, [1, 2, 4, 5, 6, 7, 8, 9]),
           make_prompt(4, 6, [5])]


def test_transformers_unguided_batched_with_left_padding(tiny_model):
    engine = TransformersEngine(str(tiny_model), max_new_tokens=6, guided=False, batch_size=4)
    batched = engine.generate(PROMPTS)
    assert len(batched) == len(PROMPTS) and all(a.tokens == 6 for a in batched)  # random weights: no eos
    assert len({a.text for a in batched}) > 1
    # left padding done right: a prompt's greedy answer is the same alone and in a padded batch
    engine.batch_size = 1
    assert engine.generate(PROMPTS) == batched


def test_transformers_guided_gives_only_allowed_answers(tiny_model):
    engine = TransformersEngine(str(tiny_model), max_new_tokens=2, guided=True, batch_size=4)
    for prompt, answer in zip(PROMPTS, engine.generate(PROMPTS)):
        assert answer.text in allowed_answers(prompt)  # max_new_tokens grows to fit the longest answer
        assert answer.tokens == len(engine.tokenizer(answer.text)["input_ids"]) + 1  # + eos


def test_transformers_sampling_is_seeded_and_chat_template_used(tmp_path):
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    folder = build_tiny_model(tmp_path, TITLES, chat_template=template, init_range=0.02)
    engine = TransformersEngine(str(folder), max_new_tokens=4, temperature=1.0, guided=True, batch_size=4)
    assert engine.tokenizer.chat_template == template
    first, again = engine.generate(PROMPTS * 2, seed=5), engine.generate(PROMPTS * 2, seed=5)
    assert first == again
    outcomes = [parse_answer(a.text, p)[0] for p, a in zip(PROMPTS * 2, first)]
    assert set(outcomes) <= {"valid", "none"} and "valid" in outcomes


@pytest.mark.slow
def test_transformers_backend_on_a_ray_actor_matches_single_process(ray_session, tiny_model, tmp_path):
    from llm_labeling.prompt import build_prompts
    from llm_labeling.run import label, read_records
    from shards.prepared import Item, PreparedDataset, UserSequence

    users = [UserSequence(u, f"u{u}", train, valid=1, test=2) for u, train in
             enumerate([[3, 2, 4, 5, 1], [7, 10, 3], [1, 2, 4, 5, 6, 7, 8, 9, 10], [5, 6], [6], [11, 8, 7, 11]], 1)]
    ds = PreparedDataset([Item(i, f"i{i}", t, None) for i, t in enumerate(TITLES, 1)], users)
    ds.save(tmp_path / "prepare")
    cfg = LabelConfig(backend="transformers", model_path=str(tiny_model), users_per_shard=3, num_actors=1,
                      batch_size=2, max_new_tokens=6, guided=False)
    metrics = label(cfg, tmp_path / "prepare", tmp_path / "label")
    prompts, _ = build_prompts(ds, users)
    answers = TransformersEngine(str(tiny_model), max_new_tokens=6, guided=False, batch_size=2).generate(prompts)
    assert [(r["user"], r["answer"]) for r in read_records(tmp_path / "label")] == \
        [(p.user, a.text) for p, a in zip(prompts, answers)]
    assert metrics["eligible_users"] == 5 and metrics["generated_tokens"] == 5 * 6
    assert metrics["outcomes"]["malformed"] == 5  # an untrained model writes noise, counted, never a pair
