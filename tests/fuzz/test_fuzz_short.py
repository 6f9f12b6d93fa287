"""A short, fixed-seed run of every fuzz harness (tests/fuzz/fuzz_*.py): each replays its seeds, the inputs of
every crash found so far among them, then tries a fixed number of inputs derived from them with libFuzzer's
seed 1 (and Python's hash seed 0), so the run is the same every time. What it proves: each harness still
runs, and none of the inputs it reaches breaks the target's invariants (see each harness's docstring). The
standing campaign (`bench/fuzz.py --minutes N`) runs the same harnesses for as long as it is given."""

from __future__ import annotations

import pytest

from tests.fuzz import campaign

#: inputs per harness, seeds included: 1-3 s each on a 2-core host at load 1, but config ~15 s (an input is
#: two config loads, ~30 ms each with the loader instrumented)
RUNS = {"framer": 3000, "er7": 3000, "fhir": 1500, "config": 200, "siu": 3000, "srm": 3000, "pharmacy": 3000,
        "token": 3000}


def test_every_harness_has_a_short_run():
    assert sorted(RUNS) == sorted(campaign.TARGETS)


@pytest.mark.parametrize("target", sorted(campaign.TARGETS))
def test_short_fixed_seed_run_finds_nothing(target, tmp_path):
    result = campaign.run(target, corpus=tmp_path / "corpus", artifacts=tmp_path / "artifacts", runs=RUNS[target],
                          seed=1, timeout=60)
    assert not result.failed, campaign.report(result)
    assert result.executions == RUNS[target], result.output[-2000:]
