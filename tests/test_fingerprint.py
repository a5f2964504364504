"""Committed numbers stay true: the quick suite's demonstrations (hashed exactly), a short fixed-thread
behaviour-cloning run and a fixed-seed 2-iteration Laplace run equal the fingerprint recorded when the committed
quickstart example was made."""

from __future__ import annotations

import json

from ript_ablate.bench.fingerprint import COMMITTED, differences, quick_suite_fingerprint, recorded


def test_quick_suite_demonstrations_and_base_match_the_committed_fingerprint():
    now = quick_suite_fingerprint()
    committed, same_machine = recorded(now["machine"])
    assert not differences(now, committed, same_machine), "\n".join(differences(now, committed, same_machine))


def test_a_moved_fingerprint_is_told_apart_from_a_moved_key():
    committed = json.loads(COMMITTED.read_text())["fingerprints"][0]
    same_key = {**committed, "demo_sha256": "0" * 64}
    assert "cache key did not" in differences(same_key, committed)[0]
    new_key = {**committed, "demo_sha256": "0" * 64, "demo_key": "another"}
    assert "changed (new key another" in differences(new_key, committed)[0]
    moved_base = {**committed, "bc": [v * (1 + 1e-4) for v in committed["bc"]]}
    assert "base's cache key did not" in differences(moved_base, committed)[0]
    assert differences({**committed, "base_key": "renamed"}, committed) == []  # a new key over the same content
    moved_run = json.loads(json.dumps(committed))
    moved_run["laplace_run"][-1]["eval/success_rate"] += 0.25
    assert "Laplace run moved" in differences(moved_run, committed)[0]


def test_another_machines_fingerprint_is_compared_with_the_cross_machine_tolerance():
    committed = json.loads(COMMITTED.read_text())["fingerprints"][0]
    drifted = json.loads(json.dumps(committed))
    drifted["bc"] = [v * (1 + 2e-5) for v in committed["bc"]]  # another CPU's kernels
    assert differences(drifted, committed, same_machine=False) == []
    assert differences(drifted, committed, same_machine=True)  # on the recording machine it is a change
    flipped = json.loads(json.dumps(committed))
    flipped["laplace_run"][1]["train/success_rate"] += 1 / 32  # one episode more succeeded: a change anywhere
    assert differences(flipped, committed, same_machine=False)
    assert recorded("no such machine")[1] is False
