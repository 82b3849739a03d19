import subprocess

import pytest

from tests.helpers import REPO

SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))


def test_there_are_scripts():
    assert {p.name for p in SCRIPTS} >= {"train.sbatch", "label.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_parse_and_document_themselves(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert text.splitlines()[0] in ("#!/bin/bash", "#!/usr/bin/env bash") and "#SBATCH" in text
    header = text.split("#SBATCH", 1)[0]
    assert "Environment" in header or "env" in header.lower()  # documented at the top: how to override
