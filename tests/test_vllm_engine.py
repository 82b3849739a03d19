"""The vLLM engine on CPU, against a fake `vllm` module (the real one is a CUDA build: never a CI path).

The fake records what the engine hands vLLM (the `LLM(...)` arguments, every `generate` call with its
prompts and per-prompt SamplingParams) and answers with objects shaped like vLLM's `RequestOutput`.
What stays untested here: vLLM itself (its scheduler, structured-output grammar and sampling) on a GPU.
"""
from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest

from llm_labeling.backends import DeterministicEngine, VllmEngine, answer_budget, build_engine
from llm_labeling.config import LabelConfig
from llm_labeling.parse import allowed_answers
from llm_labeling.prompt import render_chat
from llm_labeling.run import ShardLabeler, label_prompts
from tests.test_labeling_backends import PROMPTS, TITLES, make_prompt

# A template that writes BOS itself, as Llama's and many others do.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer(folder: Path, chat_template: str | None) -> Path:
    """A byte-level BPE trained here whose tokenizer adds BOS on `add_special_tokens=True` (bos != eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(TITLES + [p.text for p in PROMPTS] + [f"{i}-{j}" for i in range(30) for j in range(30)],
                            trainer)
    bos = ("<s>", raw.token_to_id("<s>"))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    if chat_template:
        tokenizer.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


# ---------------------------------------------------------------- the fake vllm

@dataclasses.dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclasses.dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class FakeParams:
    """SamplingParams / StructuredOutputsParams: keyword arguments only, kept as given."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.__dict__.update(kwargs)


class FakeLLM:
    instances: list[FakeLLM] = []
    script: dict[tuple[int, ...], str] = {}  # prompt token ids -> answer; else a seeded pick among the choices

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        self.tokenizer = load_tokenizer(Path(kwargs.get("tokenizer", kwargs["model"])))
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    def _answer(self, prompt_ids: list[int], params: FakeParams) -> str:
        if tuple(prompt_ids) in self.script:
            return self.script[tuple(prompt_ids)]
        structured = params.kwargs.get("structured_outputs")
        if structured is None:
            return "I think 1-2"
        choices = structured.kwargs["choice"]
        return choices[params.seed % len(choices)] if params.temperature > 0 else choices[0]

    def generate(self, prompts, sampling_params=None, use_tqdm=True, **kwargs):
        self.calls.append({"prompts": prompts, "params": sampling_params, "use_tqdm": use_tqdm, **kwargs})
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        tok, outputs = self.tokenizer, []
        for prompt, params in zip(prompts, sampling_params):
            ids = tok(self._answer(prompt["prompt_token_ids"], params), add_special_tokens=False)["input_ids"]
            ids = (ids + [tok.eos_token_id])[:params.max_tokens]  # like vLLM: eos counted, cut at max_tokens
            finish = "stop" if ids[-1] == tok.eos_token_id else "length"
            text = " " + tok.decode(ids, skip_special_tokens=True) + "\n"  # models pad answers with whitespace
            outputs.append(RequestOutput(prompt["prompt_token_ids"], [CompletionOutput(text, ids, finish)]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    sampling = types.ModuleType("vllm.sampling_params")
    vllm.LLM, vllm.SamplingParams, vllm.sampling_params = FakeLLM, FakeParams, sampling
    sampling.SamplingParams = sampling.StructuredOutputsParams = FakeParams
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    monkeypatch.setattr(FakeLLM, "instances", [])
    monkeypatch.setattr(FakeLLM, "script", {})
    return vllm


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("chat-model"), TEMPLATE)


def vllm_cfg(model: Path, **kwargs) -> LabelConfig:
    return LabelConfig(backend="vllm", model_path=str(model), **kwargs)


# ---------------------------------------------------------------- tests

def test_llm_arguments(fake_vllm, chat_model, tmp_path):
    build_engine(vllm_cfg(chat_model), [])
    build_engine(vllm_cfg(chat_model, tensor_parallel_size=2), [])
    gguf_dir = build_tokenizer(tmp_path / "gguf", TEMPLATE)
    (gguf_dir / "model.gguf").write_bytes(b"GGUF")
    build_engine(vllm_cfg(gguf_dir / "model.gguf"), [])
    assert [llm.kwargs for llm in FakeLLM.instances] == [
        {"model": str(chat_model), "tensor_parallel_size": 1},
        # no Ray executor inside a Ray actor: tensor parallelism on vLLM's own processes
        {"model": str(chat_model), "tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
        {"model": str(gguf_dir / "model.gguf"), "tensor_parallel_size": 1, "tokenizer": str(gguf_dir)},
    ]


def test_one_generate_call_chat_token_ids_seeds_and_structured_outputs(fake_vllm, chat_model):
    engine = build_engine(vllm_cfg(chat_model, max_new_tokens=2, temperature=0.7), [])
    assert isinstance(engine, VllmEngine)
    answers = engine.generate(PROMPTS, seed=7)
    [call] = FakeLLM.instances[0].calls
    assert call["use_tqdm"] is False

    tok = load_tokenizer(chat_model)
    for prompt, request in zip(PROMPTS, call["prompts"]):
        ids = request["prompt_token_ids"]
        # the chat template's own BOS, once; the text route with special tokens would give two
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        assert tok(render_chat(tok, prompt.text))["input_ids"].count(tok.bos_token_id) == 2
        assert ids == tok(render_chat(tok, prompt.text), add_special_tokens=False)["input_ids"]
        assert tok.decode(ids).endswith("<|assistant|>")

    for i, (prompt, params, answer) in enumerate(zip(PROMPTS, call["params"], answers)):
        assert set(params.kwargs) == {"temperature", "max_tokens", "seed", "structured_outputs"}
        assert params.seed == 7 + i and params.temperature == 0.7
        assert params.structured_outputs.kwargs == {"choice": allowed_answers(prompt)}
        # max_new_tokens=2 is raised to fit the longest allowed answer and its eos
        longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in allowed_answers(prompt))
        assert params.max_tokens == answer_budget(prompt, 2) >= longest + 1 > 2
        choices = allowed_answers(prompt)
        assert answer.text == choices[(7 + i) % len(choices)]  # whitespace stripped
        assert answer.tokens == len(tok(answer.text, add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert engine.generate([], seed=7) == [] and len(FakeLLM.instances[0].calls) == 1


def test_unguided_and_no_chat_template(fake_vllm, tmp_path):
    plain = build_tokenizer(tmp_path / "plain", chat_template=None)
    engine = build_engine(vllm_cfg(plain, guided=False, max_new_tokens=40), [])
    answers = engine.generate(PROMPTS[:2], seed=0)
    [call] = FakeLLM.instances[0].calls
    tok = load_tokenizer(plain)
    for prompt, request, params in zip(PROMPTS, call["prompts"], call["params"]):
        assert "structured_outputs" not in params.kwargs and params.max_tokens == 40
        # no template: the plain prompt, with the tokenizer's special tokens (one BOS)
        assert request["prompt_token_ids"] == tok(prompt.text)["input_ids"]
        assert request["prompt_token_ids"].count(tok.bos_token_id) == 1
    assert [a.text for a in answers] == ["I think 1-2"] * 2


def test_shard_loop_records_match_the_deterministic_backend(fake_vllm, chat_model):
    """Through run.ShardLabeler (what each Ray actor runs): the fake answers what the deterministic engine
    answers, looked up by the exact chat-template token ids, so the records must be the same."""
    prompts = PROMPTS + [make_prompt(5, 11, [8, 3, 7]), make_prompt(6, 10, [7, 8, 5]), make_prompt(7, 3, [7, 10, 8])]
    tok = load_tokenizer(chat_model)
    deterministic = DeterministicEngine(TITLES)
    FakeLLM.script = {tuple(tok(render_chat(tok, p.text), add_special_tokens=False)["input_ids"]):
                      deterministic.answer(p) for p in prompts}
    expected = ShardLabeler(dataclasses.asdict(LabelConfig()), TITLES, seed=3).label(4, prompts)[1]
    assert {r["outcome"] for r in expected} == {"valid", "none"}

    labeler = ShardLabeler(dataclasses.asdict(vllm_cfg(chat_model, batch_size=2)), [], seed=3)
    shard, records, tokens, _ = labeler.label(4, prompts)
    assert (shard, records) == (4, expected)
    assert tokens == sum(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) + 1 for r in records)
    [call] = FakeLLM.instances[0].calls  # the whole shard in one generate call, whatever label.batch_size says
    assert len(call["prompts"]) == len(prompts)


def test_seeds_do_not_depend_on_batching(fake_vllm, chat_model):
    prompts = PROMPTS * 2
    results = {}
    for batch_size in (len(prompts), 3):
        labeler = ShardLabeler(dataclasses.asdict(vllm_cfg(chat_model, temperature=1.0)), [], 3)
        records = label_prompts(labeler.engine, prompts, batch_size, 3 + 1_000_003 * 2)[0]
        calls = labeler.engine.llm.calls
        results[batch_size] = ([p.seed for c in calls for p in c["params"]], records)
        assert len(calls) == -(-len(prompts) // batch_size)
    (seeds, records), (seeds_batched, records_batched) = results.values()
    assert seeds == seeds_batched == [3 + 1_000_003 * 2 + i for i in range(len(prompts))]
    assert records == records_batched
    assert len({r["answer"] for r in records}) > 1  # the seeded fake picks differ: seeds reach the answers
