"""RankReports: a store completes once every TP rank reported it, in any steps."""

import pytest

from symram_vllm.connectors.residency import RankReports
from symram_vllm.tiers.events import TierEvent


def ev(op, keys, rank=0, tier="local"):
    return TierEvent(tier, op, tuple(keys), rank)


def test_single_rank_completes_at_once():
    stored, removed = RankReports(1).apply([ev("stored", [b"a", b"b"])])
    assert stored["local"] == [b"a", b"b"] and not removed["local"]


def test_two_ranks_across_steps_and_tiers_are_separate():
    reports = RankReports(2)
    stored, _ = reports.apply([ev("stored", [b"a"], 0), ev("stored", [b"a"], 0, "disk")])
    assert not stored["local"] and reports.waiting("local", b"a")
    stored, _ = reports.apply([ev("stored", [b"a"], 0)])  # the same rank again
    assert not stored["local"]
    stored, _ = reports.apply([ev("stored", [b"a"], 1)])
    assert stored["local"] == [b"a"] and not stored["disk"] and reports.waiting("disk", b"a")


def test_removal_forgets_partial_reports():
    reports = RankReports(2)
    reports.apply([ev("stored", [b"a"], 0)])
    _, removed = reports.apply([ev("removed", [b"a"], 1)])
    assert removed["local"] == [b"a"] and not reports.waiting("local", b"a")
    stored, _ = reports.apply([ev("stored", [b"a"], 1)])
    assert not stored["local"]


def test_pending_reports_are_bounded():
    reports = RankReports(2, limit=3)
    reports.apply([ev("stored", [bytes([i])], 0) for i in range(10)])
    assert len(reports) <= 4


def test_bad_tp_size():
    with pytest.raises(ValueError, match="tp_size"):
        RankReports(0)
