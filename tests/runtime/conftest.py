"""Fixtures for tests/runtime: tiny model dirs (built once a session) and in-process servers."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_testkit import ServerThread, make_image_model_dir, make_text_model_dir


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory) -> Path:
    return make_text_model_dir(tmp_path_factory.mktemp("text_model"))


@pytest.fixture(scope="session")
def image_model_dir(tmp_path_factory) -> Path:
    return make_image_model_dir(tmp_path_factory.mktemp("image_model"))


@pytest.fixture
def text_server(text_model_dir):
    with ServerThread(text_model_dir) as s:
        yield s


@pytest.fixture
def image_server(image_model_dir):
    with ServerThread(image_model_dir) as s:
        yield s
