"""The labeling stage: prompts for every eligible user, answered by engines on Ray actors.

Users are split in order into shards of `users_per_shard`; shard k's records go to
`pairs-{k:05d}.jsonl` (one JSON record per eligible user: user, target, similar, answer, outcome;
dense ids, similar = -1 unless the outcome is 'valid'). Actors only compute; the driver writes
each shard file atomically (temp file + os.replace), so a shard file that exists is complete.
A re-run skips the shards that exist, which makes a killed job resume with no gaps and no
duplicates. The resume state, `checkpoint/progress.json`, records a fingerprint of everything that
changes the answers (config, seed, dataset) and the number of shards; when the fingerprint differs,
the old shard files are deleted and all shards redone. The stage's one manifest is the
`manifest.json` that run_stage writes (its metrics hold the number of shards); a folder of the
old layout has its `label_manifest.json` moved to `checkpoint/progress.json` (migrate_progress).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import tempfile
import time
from collections import Counter, deque
from pathlib import Path

from llm_labeling.backends import BACKENDS, build_engine
from llm_labeling.config import LabelConfig
from llm_labeling.parse import OUTCOMES, parse_answer
from llm_labeling.prompt import Prompt, build_prompts, clean_title
from shards.prepared import PreparedDataset
from sicsrec.runtime.rundir import Upstream, fingerprinted, hash_files, read_manifest

log = logging.getLogger(__name__)

PROGRESS = Path("checkpoint") / "progress.json"
OLD_PROGRESS = "label_manifest.json"  # where the resume state was kept before checkpoint/
SHARD_GLOB = "pairs-*.jsonl"
GPU_BACKENDS = ("vllm",)
# Settings that do not change any answer: changing them keeps the finished shards. (batch_size does:
# sampling draws per batch, and padding can move a near-tie of greedy decoding.)
_NOT_IN_FINGERPRINT = {"num_actors", "ray_address", "max_restarts", "tensor_parallel_size"}


def shard_path(out_dir: Path, shard: int) -> Path:
    return Path(out_dir) / f"pairs-{shard:05d}.jsonl"


def labels_input(out_dir: Path) -> Upstream:
    """The `label` stage as another stage's input: identified by its pairs' content (an LLM need
    not answer alike twice, so a re-label is a new input even under the same config)."""
    return Upstream("label", Path(out_dir), (SHARD_GLOB,), by_content=True)


def label_prompts(engine, prompts: list[Prompt], batch_size: int, seed: int) -> tuple[list[dict], int]:
    """Answer and parse `prompts` in batches: (records, generated tokens)."""
    records, tokens = [], 0
    for start in range(0, len(prompts), max(1, batch_size)):
        batch = prompts[start:start + batch_size]
        for prompt, answer in zip(batch, engine.generate(batch, seed=seed + start)):
            outcome, similar = parse_answer(answer.text, prompt)
            records.append({"user": prompt.user, "target": prompt.target, "similar": similar,
                            "answer": answer.text, "outcome": outcome})
            tokens += answer.tokens
    return records, tokens


class ShardLabeler:
    """A Ray actor holding one engine; labels one shard per call."""

    def __init__(self, cfg: dict, corpus_titles: list[str], seed: int):
        self.cfg = LabelConfig(**cfg)
        self.engine = build_engine(self.cfg, corpus_titles)
        self.seed = seed

    def label(self, shard: int, prompts: list[Prompt]) -> tuple[int, list[dict], int, float]:
        start = time.perf_counter()
        # Seeded by shard, not by actor: an answer does not depend on which actor computed it.
        # vLLM batches continuously by itself: a whole shard per generate call keeps it busy
        # (its per-prompt seeds make the answers independent of the batching).
        batch_size = len(prompts) if self.cfg.backend in GPU_BACKENDS else self.cfg.batch_size
        records, tokens = label_prompts(self.engine, prompts, batch_size, self.seed + 1_000_003 * shard)
        return shard, records, tokens, time.perf_counter() - start


# ---------------------------------------------------------------- Ray

def ray_home() -> Path:
    """HOME of the local cluster's processes; a second driver joining that cluster needs it (auth token)."""
    return Path(tempfile.gettempdir()) / f"sicsrec-ray-home-{os.getuid()}"


def start_local_ray(num_cpus: int, **kwargs) -> None:
    """A single-node Ray on loopback only: no usage stats, no dashboard, no cloud-metadata probe.

    Checked with strace (Ray 2.60): `_node_ip_address="127.0.0.1"` alone is not enough, Ray turns a
    loopback address into the host's own IP (found via a UDP socket toward 8.8.8.8) and binds there
    unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0. And Ray's dashboard process probes cloud metadata
    addresses (169.254.169.254, metadata.google.internal) unless `~/ray_bootstrap_config.yaml`
    names a provider, so Ray's processes are started with HOME pointing to a folder holding one
    (`provider: {type: local}`); the driver's HOME is restored after `ray.init`."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # process-wide on purpose: read by Ray's child processes and by any driver this process starts
    # (a second `label` connecting with ray_address resolves 127.0.0.1 to the host IP without it)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # the same, in case Ray was imported before the variable was set
    home = ray_home()
    home.mkdir(mode=0o700, exist_ok=True)  # Ray keeps its cluster auth token in ~/.ray/auth_token
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                 configure_logging=False, log_to_driver=False, **kwargs)
    finally:
        if old_home is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = old_home


def _connect_ray(cfg: LabelConfig) -> bool:
    """Connect to `cfg.ray_address` or start a local cluster; True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, configure_logging=False)
        return True
    # One CPU per actor plus one spare: actors never hold every CPU of the cluster.
    start_local_ray(num_cpus=max(1, cfg.num_actors) + 1)
    return True


def _actor_resources(cfg: LabelConfig) -> tuple[dict, int]:
    """(per-actor resources, how many such actors the cluster can hold)."""
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if cfg.backend in GPU_BACKENDS:
        per_actor = max(1, cfg.tensor_parallel_size)
        if gpus < per_actor:
            raise ValueError(f"label.backend={cfg.backend} needs {per_actor} GPU(s) per actor, the Ray cluster has "
                             f"{gpus}; use backend=transformers or deterministic on CPU")
        return {"num_cpus": 1, "num_gpus": per_actor}, gpus // per_actor
    if cfg.backend == "transformers" and gpus:
        return {"num_cpus": 1, "num_gpus": 1}, gpus
    return {"num_cpus": 1}, max(1, int(total.get("CPU", 1)) - 1)


# ---------------------------------------------------------------- the stage

def _fingerprint(cfg: LabelConfig, seed: int, prepared_dir: Path) -> str:
    relevant = {k: v for k, v in fingerprinted(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    dataset = hash_files([prepared_dir / "items.jsonl", prepared_dir / "sequences.jsonl"])
    blob = json.dumps({"config": relevant, "seed": seed, "dataset": dataset}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def migrate_progress(out_dir: Path) -> None:
    """Move a labeling folder's resume state from its old place (`label_manifest.json`, same
    content) to `checkpoint/progress.json`; its shard files stay as they are."""
    old = Path(out_dir) / OLD_PROGRESS
    if old.exists():
        (Path(out_dir) / PROGRESS).parent.mkdir(exist_ok=True)
        os.replace(old, Path(out_dir) / PROGRESS)


def _prepare_out_dir(out_dir: Path, fingerprint: str, num_shards: int, cfg: LabelConfig, seed: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    migrate_progress(out_dir)
    for stray in out_dir.glob("*.tmp"):  # left by a killed run: never complete
        stray.unlink()
    progress_path = out_dir / PROGRESS
    old = json.loads(progress_path.read_text()) if progress_path.exists() else None
    if old and old.get("fingerprint") == fingerprint:
        return
    stale = sorted(out_dir.glob(SHARD_GLOB))
    if stale:
        log.warning("label: config, seed or dataset changed since %s was written; deleting %d old shard file(s) "
                    "and labeling again", progress_path, len(stale))
        for path in stale:
            path.unlink()
    progress_path.parent.mkdir(exist_ok=True)
    progress = {"fingerprint": fingerprint, "num_shards": num_shards, "seed": seed,
                "config": dataclasses.asdict(cfg)}
    _atomic_write(progress_path, json.dumps(progress, indent=2) + "\n")


def _read_shard(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _label_on_ray(cfg: LabelConfig, shard_prompts: list[list[Prompt]], todo: deque, out_dir: Path,
                  corpus: list[str], seed: int) -> Counter:
    """Label the shards in `todo` on a pool of actors, each given its next shard when it finishes one;
    the driver writes each shard's file as its result arrives. Returns prompts, tokens, engine_seconds
    and num_actors."""
    import ray
    from tqdm import tqdm

    started = _connect_ray(cfg)
    actors, running, done = [], {}, Counter()
    try:
        resources, capacity = _actor_resources(cfg)
        done["num_actors"] = max(1, min(cfg.num_actors, capacity, len(todo)))
        actor_class = ray.remote(max_restarts=cfg.max_restarts, max_task_retries=cfg.max_restarts,
                                 **resources)(ShardLabeler)
        actors = [actor_class.remote(dataclasses.asdict(cfg), corpus, seed) for _ in range(done["num_actors"])]

        def submit(actor) -> None:
            shard = todo.popleft()
            running[actor.label.remote(shard, shard_prompts[shard])] = actor

        with tqdm(total=len(shard_prompts), initial=len(shard_prompts) - len(todo),
                  desc=f"label ({cfg.backend}, {len(actors)} actor(s))", unit="shard") as bar:
            for actor in actors:
                submit(actor)
            while running:
                [ref], _ = ray.wait(list(running), num_returns=1)
                actor = running.pop(ref)
                shard, records, tokens, seconds = ray.get(ref)
                _atomic_write(shard_path(out_dir, shard),
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                done.update(prompts=len(records), tokens=tokens, engine_seconds=seconds)
                bar.update(1)
                if todo:
                    submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
    return done


def labeled_users(dataset: PreparedDataset, max_users: int, seed: int) -> list:
    """Every user, or a sample of `max_users` drawn with `seed`, in dataset order."""
    if max_users < 0:
        raise ValueError(f"label.max_users must be >= 0, got {max_users}")
    if not max_users or max_users >= len(dataset.users):
        return dataset.users
    keep = sorted(random.Random(seed).sample(range(len(dataset.users)), max_users))
    return [dataset.users[i] for i in keep]


def label(cfg: LabelConfig, prepared_dir: Path, out_dir: Path, seed: int = 0, force: bool = False) -> dict:
    """Label every eligible user of the PreparedDataset in `prepared_dir` into `out_dir`; returns metrics.
    Finished shards are kept unless `force`."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown label.backend {cfg.backend!r}; expected one of {BACKENDS}")
    if cfg.users_per_shard < 1:
        raise ValueError(f"label.users_per_shard must be >= 1, got {cfg.users_per_shard}")
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    dataset = PreparedDataset.load(prepared_dir)
    if force:
        migrate_progress(out_dir)
        if (out_dir / PROGRESS).exists():
            (out_dir / PROGRESS).unlink()
            for path in out_dir.glob(SHARD_GLOB):
                path.unlink()
    sampled = labeled_users(dataset, cfg.max_users, seed)
    n = cfg.users_per_shard
    shard_users = [sampled[i:i + n] for i in range(0, len(sampled), n)]
    shard_prompts, ineligible = [], Counter()
    for users in shard_users:
        prompts, skipped = build_prompts(dataset, users, cfg.max_candidates, cfg.max_title_chars, cfg.item_noun)
        shard_prompts.append(prompts)
        ineligible += skipped
    _prepare_out_dir(out_dir, _fingerprint(cfg, seed, prepared_dir), len(shard_prompts), cfg, seed)
    todo = deque(k for k in range(len(shard_prompts)) if not shard_path(out_dir, k).exists())
    shards_to_label = len(todo)

    start = time.perf_counter()
    # Only the deterministic backend reads titles outside the prompts (for its idf).
    corpus = [clean_title(t, cfg.max_title_chars) for t in dataset.titles()[1:]] \
        if cfg.backend == "deterministic" else []
    run = _label_on_ray(cfg, shard_prompts, todo, out_dir, corpus, seed) if todo else Counter(num_actors=0)
    labeled_prompts, tokens = run["prompts"], run["tokens"]
    wall = time.perf_counter() - start

    outcomes = Counter({o: 0 for o in OUTCOMES})
    for k, prompts in enumerate(shard_prompts):
        records = _read_shard(shard_path(out_dir, k))
        if [r["user"] for r in records] != [p.user for p in prompts]:
            raise RuntimeError(f"{shard_path(out_dir, k)} does not hold exactly one record per eligible user of "
                               f"shard {k}; delete it and re-run")
        outcomes.update(r["outcome"] for r in records)
    eligible = sum(len(p) for p in shard_prompts)
    metrics = {
        "backend": cfg.backend,
        "shards": len(shard_prompts),
        "shards_labeled_now": shards_to_label,
        "users": len(dataset.users),
        "users_sampled": len(sampled),
        "eligible_users": eligible,
        "ineligible_users": dict(sorted(ineligible.items())),
        "outcomes": dict(outcomes),
        "valid_pairs": outcomes["valid"],
        "valid_rate": round(outcomes["valid"] / eligible, 4) if eligible else 0.0,
        "num_actors": run["num_actors"],
        "prompts_labeled_now": labeled_prompts,
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        "engine_s": round(run["engine_seconds"], 3),
        "prompts_per_s": round(labeled_prompts / wall, 2) if labeled_prompts else 0.0,
        "tokens_per_s": round(tokens / wall, 2) if labeled_prompts else 0.0,
    }
    sample = f" (a seeded sample of {len(sampled)})" if len(sampled) < len(dataset.users) else ""
    print(f"label: {eligible} eligible of {len(dataset.users)} users{sample} ({dict(ineligible) or 'none'} ineligible); "
          f"outcomes {dict(outcomes)}; this run: {labeled_prompts} prompts in {wall:.1f}s = "
          f"{metrics['prompts_per_s']} prompts/s, {metrics['tokens_per_s']} generated tokens/s")
    return metrics


def _num_shards(out_dir: Path) -> int:
    """The shard count of a labeling run: from its stage manifest, or (a run outside the launcher,
    or one not finished) from its resume state."""
    manifest = read_manifest(out_dir)
    if manifest:
        return manifest["metrics"]["shards"]
    for progress in (out_dir / PROGRESS, out_dir / OLD_PROGRESS):
        if progress.exists():
            return json.loads(progress.read_text())["num_shards"]
    raise FileNotFoundError(f"{out_dir} holds no labeling run (no manifest.json or {PROGRESS}); "
                            f"run `launcher label` first")


def read_records(out_dir: Path) -> list[dict]:
    """All records of a finished labeling run, in shard order."""
    out_dir = Path(out_dir)
    num_shards = _num_shards(out_dir)
    missing = [k for k in range(num_shards) if not shard_path(out_dir, k).exists()]
    if missing:
        raise FileNotFoundError(f"labeling in {out_dir} is unfinished: {len(missing)} of {num_shards} shard file(s) "
                                f"missing (first: {shard_path(out_dir, missing[0]).name}); re-run `launcher label`")
    return [r for k in range(num_shards) for r in _read_shard(shard_path(out_dir, k))]


def read_pairs(out_dir: Path) -> list[tuple[int, int]]:
    """The valid (target, similar) dense item-id pairs, for the SFT stage."""
    return [(r["target"], r["similar"]) for r in read_records(out_dir) if r["outcome"] == "valid"]
