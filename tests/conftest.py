"""Shared fixtures: small text corpora made on the spot (no ../shared needed), tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pydoc_text(n_chars: int = 60_000) -> str:
    """English text that ships with every Python: the first n_chars of its help topics."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:n_chars]


MIXED = "Hello, world! 你好，世界。 naïve café — emoji 🙂🚀 tabs\tand\nnewlines\r\n数学 ∑x² = 1"


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(pydoc_text(), encoding="utf-8")
    return p


TINY_TRAIN = dict(steps=12, batch_size=4, warmup_steps=2, eval_interval=6, eval_iters=2, log_interval=1)
