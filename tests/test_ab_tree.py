"""benchmarks/ab_tree.sh: an older commit's package and benchmarks exported for a same-run A/B."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_ab_tree_exports_the_package_without_weights_or_results(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "benchmarks/ab_tree.sh"), "HEAD"], cwd=ROOT, env={**os.environ, "AB_ROOT": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    dest = tmp_path / sha
    assert str(dest) in out
    assert (dest / "tinyserve_patch/ops/triton_score.py").read_text() == subprocess.run(
        ["git", "show", "HEAD:tinyserve_patch/ops/triton_score.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert (dest / "benchmarks/bench_kernels.py").exists()
    assert not (dest / "tinyserve_patch/models").exists() and not (dest / "tinyserve_patch/eval").exists()
    assert not (dest / "benchmarks/results").exists()
