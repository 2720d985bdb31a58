"""Shared test fixtures: where ../shared lives, and skipping tests that need it when it is absent."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("EDGECC_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not (SHARED / "models").is_dir():
        pytest.skip(f"../shared is absent ({SHARED}); these tests run in CI where it is present")
    return SHARED
