"""The rollout order every target follows, decided as data before anything runs (targets/base.py)."""

from ops_pipeline.targets.base import Swap, rollout_plan


def test_same_size_swaps_one_for_one_in_order():
    assert rollout_plan(["a", "b", "c"], 3) == [Swap(0, "a"), Swap(1, "b"), Swap(2, "c")]


def test_scale_up_adds_slots_that_retire_nothing():
    assert rollout_plan(["a"], 3) == [Swap(0, "a"), Swap(1, None), Swap(2, None)]


def test_scale_down_retires_the_extra_old_instances_last():
    assert rollout_plan(["a", "b", "c", "d"], 2) == [Swap(0, "a"), Swap(1, "b"), Swap(None, "c"), Swap(None, "d")]


def test_first_release_only_starts():
    assert rollout_plan([], 2) == [Swap(0, None), Swap(1, None)]


def test_every_old_instance_retires_exactly_once_and_every_slot_starts_once():
    for old_n in range(6):
        for slots in range(1, 6):
            old = [f"o{i}" for i in range(old_n)]
            plan = rollout_plan(old, slots)
            assert sorted(s.retire for s in plan if s.retire) == sorted(old)
            assert [s.slot for s in plan if s.slot is not None] == list(range(slots))
            assert all(s.slot is not None or s.retire for s in plan)
