"""Run directories and stage manifests.

Each stage writes `<run_dir>/<stage>/manifest.json` last: its config section, the git revision,
its inputs' fingerprints, metrics and wall time. A stage whose manifest exists with the same
fingerprint is skipped; `--force` redoes it.

A finished stage is never lost to a failed re-run: when `<stage>/` holds a finished result, the
re-run works in `.<stage>.next/` beside it (resumable there, like any run) and replaces
`<stage>/` only when it succeeds; until then downstream stages keep reading the old result.
A stage without a finished result runs in place.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
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
    """Write JSON atomically (temp file, fsync, rename): a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ManifestError(ValueError):
    """A manifest.json that exists but cannot be read (cut off, not JSON, not a manifest)."""


def read_manifest(stage_dir: Path) -> dict | None:
    """The stage's manifest, None when it has none; ManifestError (naming the file) when unreadable."""
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is unreadable ({err}): re-run that stage (or use --force) to rewrite it") from None
    if not isinstance(manifest, dict) or "fingerprint" not in manifest:
        raise ManifestError(f"{path} is not a stage manifest (no fingerprint): re-run that stage (or use --force) "
                            f"to rewrite it")
    return manifest


def _own_manifest(stage_dir: Path, name: str) -> dict | None:
    """The stage's own manifest when readable; an unreadable one counts as no finished result."""
    try:
        return read_manifest(stage_dir)
    except ManifestError as err:
        log.warning("%s: %s; running the stage again", name, err)
        return None


def _staging(stage_dir: Path, kind: str) -> Path:
    return stage_dir.with_name(f".{stage_dir.name}.{kind}")


def _finish_swap(stage_dir: Path) -> None:
    """Complete (or undo) a replacement of stage_dir that a kill interrupted between its renames."""
    old, new = _staging(stage_dir, "old"), _staging(stage_dir, "next")
    if old.exists() and not stage_dir.exists():
        os.replace(new if (new / MANIFEST).exists() else old, stage_dir)
    if old.exists():
        shutil.rmtree(old)


def _replace_dir(stage_dir: Path, new: Path) -> None:
    old = _staging(stage_dir, "old")
    os.replace(stage_dir, old)
    os.replace(new, stage_dir)
    shutil.rmtree(old)


def run_stage(stage_dir: str | Path, name: str, config_section, inputs: dict,
              body: Callable[[Path], dict], force: bool = False, is_main: bool = True) -> dict:
    """Run `body(work_dir) -> metrics` unless a matching manifest says it is done.

    `inputs` maps an input name to its fingerprint (usually an upstream manifest's).
    Returns the manifest (existing or new). Only the main rank writes the manifest and moves
    folders. work_dir is stage_dir itself, or `.<stage>.next/` while stage_dir holds a finished
    result (see the module docstring).
    """
    from sicsrec.runtime.dist import barrier

    stage_dir = Path(stage_dir)
    if is_main:
        _finish_swap(stage_dir)
    barrier()  # every rank sees the upstream manifests rank 0 has finished writing
    fp = fingerprint(config_section, inputs)
    old = _own_manifest(stage_dir, name)
    if old and old.get("fingerprint") == fp and not force:
        log.info("%s: done already (%s), skipping; --force redoes it", name, stage_dir / MANIFEST)
        return old
    work = _staging(stage_dir, "next") if old else stage_dir
    attempt = work / ".attempt"
    if is_main and work != stage_dir and work.exists() and (force or not attempt.exists()
                                                            or attempt.read_text() != fp):
        shutil.rmtree(work)  # another config's (or a forced run's) leftovers: nothing to resume
    if is_main:
        work.mkdir(parents=True, exist_ok=True)
        if work != stage_dir:
            attempt.write_text(fp)
        elif (work / MANIFEST).exists():
            (work / MANIFEST).unlink()  # unreadable: never leave it beside new outputs
    barrier()
    start = time.time()
    metrics = body(work) or {}
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
    barrier()  # every rank's outputs are written
    if is_main:
        write_json(work / MANIFEST, manifest)
        if work != stage_dir:
            attempt.unlink()
            _replace_dir(stage_dir, work)
    barrier()
    return manifest


@dataclasses.dataclass(frozen=True)
class Upstream:
    """A stage folder another stage reads. Its identity is its manifest's fingerprint; a folder
    made outside the launcher (no manifest) is identified by a hash of `files` (names or globs)
    when it holds them; a `by_content` one always by that hash ("none" when it holds none)."""
    stage: str  # the stage that makes it (`launcher <stage>`)
    dir: Path
    files: tuple[str, ...] = ()
    by_content: bool = False

    def fingerprint(self) -> str:
        manifest = None if self.by_content else read_manifest(self.dir)
        if manifest:
            return manifest["fingerprint"]
        paths = [p for pattern in self.files for p in sorted(Path(self.dir).glob(pattern))]
        if self.by_content:
            return hash_files(paths) if paths else "none"
        if not self.files or len(paths) < len(self.files):
            raise FileNotFoundError(f"stage '{self.stage}' has not run in {Path(self.dir).parent} (no "
                                    f"{Path(self.dir) / MANIFEST}): run `launcher {self.stage}` first, or "
                                    f"`python -m launcher pipeline`")
        return hash_files(paths)


@dataclasses.dataclass(frozen=True)
class StageRun:
    """What a stage body gets: its work folder, the distributed environment and its run id."""
    out: Path
    env: object
    run_id: str


def fingerprinted(section) -> dict:
    """dataclasses.asdict(section) as earlier run directories fingerprinted it, so that their
    stages are not redone when a section's layout changes but not its meaning. A section class
    may list (nested sections alike):
    - `ADDED_FIELDS` (name -> default): fields added later, left out while they hold that default;
    - `REMOVED_FIELDS` (name -> value): fields it no longer has, put back at the value they had;
    - `legacy_fingerprint(fields) -> fields`: any other move (a key into a sub-section)."""
    out = {}
    cls = type(section)
    added = getattr(cls, "ADDED_FIELDS", {})
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.name in added and value == added[f.name]:
            continue
        out[f.name] = fingerprinted(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    out.update(copy.deepcopy(getattr(cls, "REMOVED_FIELDS", {})))
    legacy = getattr(cls, "legacy_fingerprint", None)
    return legacy(out) if legacy else out


def run_declared(name: str, out_dir: str | Path, section, inputs: dict, body: Callable[[StageRun], dict],
                 force: bool = False, seed: int | None = None, per_world_size: bool = False) -> dict:
    """The one way a stage runs. Initialises the distributed environment, waits for rank 0's
    upstream manifests, fingerprints `inputs` (Upstream folders or fixed strings), adds `seed` to
    the config section (a dataclass or a dict) when the stage uses one, derives the run id (per
    world size when the stage's checkpoints depend on it) and hands `body` to run_stage (skipped
    when the manifest matches, resumed, or redone with force)."""
    from sicsrec.runtime import dist as distenv

    env = distenv.init(distenv.detect())
    distenv.barrier()  # rank 0 may still be writing the previous stage's manifest
    section = fingerprinted(section) if dataclasses.is_dataclass(section) else dict(section)
    if seed is not None:
        section["seed"] = seed
    inputs = {key: value if isinstance(value, str) else value.fingerprint() for key, value in inputs.items()}
    run_id = fingerprint(dict(section, world_size=env.world_size) if per_world_size else section, inputs)
    return run_stage(out_dir, name, section, inputs, lambda out: body(StageRun(out, env, run_id)), force,
                     env.is_main)
