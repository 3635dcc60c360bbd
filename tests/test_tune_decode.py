"""The launch sweep's command-line shapes (no GPU needed; the sweep itself runs on the device)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_parse_shape(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.tune_decode import SHAPES, parse_shape

    assert parse_shape("llama3-8b:8:65536:2048") == ("llama3-8b", 8, 65536, 2048) == SHAPES[0]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown model"):
        parse_shape("gpt5:1:1024:512")
    with pytest.raises(ValueError):
        parse_shape("llama3-8b:8:65536")
