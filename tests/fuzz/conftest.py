"""Session fixtures of the fuzzing suite: the original files (built once) and a pool of fuzz workers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fuzz.originals import build_all
from fuzz.runner import Pool
from fuzz.targets import TARGETS

WORKERS = 2
TIMEOUT_S = 10.0
MEM_MB = 512


@pytest.fixture(scope="session")
def fuzz_originals(tmp_path_factory) -> dict[str, list[str]]:
    """Target name → folders of valid originals written by deltatune's own writers."""
    built = build_all(tmp_path_factory.mktemp("fuzz-originals"))
    return {name: built[t.originals] for name, t in TARGETS.items()}


@pytest.fixture(scope="session")
def fuzz_pool(fuzz_originals) -> Iterator[Pool]:
    """Worker processes (memory-capped at +512 MB each) shared by every fuzz test of the session."""
    pool = Pool(fuzz_originals, WORKERS, TIMEOUT_S, MEM_MB)
    yield pool
    pool.close()
