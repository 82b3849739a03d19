"""Run directories and stage manifests.

Each stage writes `<run_dir>/<stage>/manifest.json` last: its config section, the git revision,
its inputs' fingerprints, metrics and wall time. A stage whose manifest exists with the same
fingerprint is skipped; `--force` redoes it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hash_files(paths) -> str:
    """Content hash of files (sorted by path); folders hash their files recursively."""
    h = hashlib.sha256()
    files = []
    for p in map(Path, paths):
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    for f in files:
        h.update(str(f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def fingerprint(config_section, input_fingerprints: dict) -> str:
    blob = json.dumps({"config": config_section, "inputs": input_fingerprints}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json(path: Path, data) -> None:
    """Write JSON atomically (temp file + rename): a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def stage_fingerprint(stage_dir: Path, files: list[str]) -> str:
    """An upstream stage's identity: its manifest's fingerprint, or (for a folder made outside
    the launcher) a hash of the named files."""
    manifest = read_manifest(stage_dir)
    return manifest["fingerprint"] if manifest else hash_files([Path(stage_dir) / f for f in files])


def read_manifest(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def run_stage(stage_dir: str | Path, name: str, config_section, inputs: dict,
              body: Callable[[Path], dict], force: bool = False, is_main: bool = True) -> dict:
    """Run `body(stage_dir) -> metrics` unless a matching manifest says it is done.

    `inputs` maps an input name to its fingerprint (usually an upstream manifest's).
    Returns the manifest (existing or new). Only the main rank writes the manifest.
    """
    from launcher.dist import barrier

    barrier()  # every rank sees the upstream manifests rank 0 has finished writing
    stage_dir = Path(stage_dir)
    fp = fingerprint(config_section, inputs)
    old = read_manifest(stage_dir)
    if old and old.get("fingerprint") == fp and not force:
        log.info("%s: done already (%s), skipping; --force redoes it", name, stage_dir / MANIFEST)
        return old
    if old and is_main:
        (stage_dir / MANIFEST).unlink()  # outputs are about to change: never leave a stale 'done'
    stage_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    metrics = body(stage_dir) or {}
    manifest = {
        "stage": name,
        "fingerprint": fp,
        "config": config_section,
        "inputs": inputs,
        "git_revision": git_revision(),
        "metrics": metrics,
        "wall_time_s": round(time.time() - start, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if is_main:
        write_json(stage_dir / MANIFEST, manifest)
    barrier()
    return manifest
