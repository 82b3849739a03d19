"""Config section `label` (SICSRec §3.3.1 sample construction)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class LabelConfig:
    backend: str = "deterministic"  # deterministic | transformers | vllm
    model_path: str = ""  # local model folder (or .gguf file) for transformers / vllm; never a hub id
    max_candidates: int = 20  # most recent earlier items offered to the LLM
    max_title_chars: int = 80
    item_noun: str = "video"  # the paper's prompt says "video" (Bilibili); e.g. "movie" for MovieLens
    users_per_shard: int = 256
    num_actors: int = 2  # Ray actors (GPU backends: one per GPU)
    batch_size: int = 32  # prompts per engine call
    max_new_tokens: int = 16
    temperature: float = 0.0
    tensor_parallel_size: int = 1
    guided: bool = True  # constrained decoding where the backend supports it
    ray_address: str = ""  # connect to an existing cluster ("auto" or host:port); empty starts a local one
    max_restarts: int = 2  # Ray restarts a crashed actor this often and retries its shard
    # 0 = every user; N > 0 = a sample of N users drawn with the run's seed (kept in dataset order):
    # a CPU-sized run of a slow backend (SFT then trains on those users' pairs only)
    max_users: int = 0
    ADDED_FIELDS: ClassVar[dict] = {"max_users": 0}  # out of the fingerprint at this default (earlier runs)
