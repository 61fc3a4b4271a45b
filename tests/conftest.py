"""Fixtures shared by the test packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.architectures import save_tiny_bert


@pytest.fixture(scope="session")
def hf_directory(tmp_path_factory) -> Path:
    """A tiny randomly initialised BERT saved by `save_pretrained` (no download)."""
    pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf") / "bert"
    save_tiny_bert(directory)
    return directory
