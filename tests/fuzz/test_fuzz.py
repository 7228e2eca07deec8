"""The fuzzing suite: seeded mutants of every loader's inputs must end in a typed error or load to the
original's exact numbers (digest-protected formats), or to valid values (recipes, configs, verify=False).

Default tier: 40 mutants per target (560 in all, about 20 s on 2 cores).  Slow tier
(``-m slow``): 1,000 per target (14,000 in all).  A failure lists each bad mutant with its target,
seed, mutation and exception; ``python benchmarks/fuzz.py --target T --replay SEED`` re-runs one in
the foreground with the full traceback.
"""

from __future__ import annotations

import pytest

from fuzz.runner import Pool, describe_failure, plan, signatures
from fuzz.targets import TARGETS

DEFAULT_PER_TARGET = 40
SLOW_PER_TARGET = 1_000
SEED = 0


def _check(pool: Pool, target: str, per_target: int, tmp_path) -> None:
    assert target not in pool.skipped, f"{target}: the loader lost its verify parameter"
    records = pool.run(plan([target], per_target, SEED), tmp_path)
    assert len(records) == per_target
    failures = signatures(records)
    report = "\n".join(f"{f['count']}× {describe_failure(f)}" for f in failures)
    assert not failures, f"{sum(f['count'] for f in failures)} of {per_target} mutants of {target} failed " \
                         f"({len(failures)} distinct):\n{report}"
    outcomes = {r["outcome"] for r in records}
    assert "typed" in outcomes, f"no mutant of {target} was rejected: the fuzzer is not reaching the loader"


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_default_tier(fuzz_pool, target, tmp_path):
    _check(fuzz_pool, target, DEFAULT_PER_TARGET, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_slow_tier(fuzz_pool, target, tmp_path):
    _check(fuzz_pool, target, SLOW_PER_TARGET, tmp_path)
