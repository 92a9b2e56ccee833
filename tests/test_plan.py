import pytest

from theseus_general import PlanError, split_evenly
from theseus_general.plan import check_groups, resolve_depths


def test_even_split():
    assert split_evenly(12, 6) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]


def test_uneven_split_puts_larger_groups_first():
    groups = split_evenly(12, 5)
    assert [len(g) for g in groups] == [3, 3, 2, 2, 2]
    assert [b for g in groups for b in g] == list(range(12))


def test_resolve_depth_ratio_and_lists():
    assert resolve_depths({"a": 12}, successor_depth=5) == {"a": 5}
    assert resolve_depths({"a": 12}, ratio=0.5) == {"a": 6}
    assert resolve_depths({"a": 3, "b": 4, "c": 6, "d": 3}, successor_depth=[2, 2, 3, 2]) == {"a": 2, "b": 2, "c": 3, "d": 2}
    spread = resolve_depths({"a": 3, "b": 4, "c": 6, "d": 3}, successor_depth=8)
    assert sum(spread.values()) == 8 and all(v >= 1 for v in spread.values())


@pytest.mark.parametrize("depth, words", [(0, "at least 1"), (-2, "at least 1"), (12, "not smaller"), (13, "not smaller")])
def test_bad_depths(depth, words):
    with pytest.raises(PlanError, match=words):
        resolve_depths({"a": 12}, successor_depth=depth)


@pytest.mark.parametrize("blocks, ratio, depth", [
    (9, 0.5, 4), (7, 0.5, 3), (3, 0.5, 1), (5, 0.5, 2),  # exact halves round down (not to even)
    (10, 0.35, 3),  # 3.4999999999999996 is a half too
    (6, 0.3, 2), (6, 0.25, 1), (10, 0.26, 3), (6, 0.09, 1),  # otherwise the nearest whole block
])
def test_ratio_rounds_to_the_nearest_block_halves_down(blocks, ratio, depth):
    assert resolve_depths({"a": blocks}, ratio=ratio) == {"a": depth}


def test_ratio_that_rounds_to_zero_blocks_is_refused_with_the_rule():
    with pytest.raises(PlanError, match=r"ratio=0.05 leaves no block in \['a'\] \(a: 6 x 0.05 = 0.3 blocks, which rounds "
                                        r"to 0; .*nearest whole block, halves down\).*ratio above 0.0833 or give successor_depth=1"):
        resolve_depths({"a": 6}, ratio=0.05)
    with pytest.raises(PlanError, match=r"no block in \['layer1'\].*one depth per container"):
        resolve_depths({"layer1": 2, "layer2": 6}, ratio=0.2)


def test_bad_ratio_and_two_targets():
    with pytest.raises(PlanError, match="strictly between 0 and 1"):
        resolve_depths({"a": 12}, ratio=1.2)
    with pytest.raises(PlanError, match="keeps every block"):
        resolve_depths({"a": 2}, ratio=0.9)
    with pytest.raises(PlanError, match="exactly one target"):
        resolve_depths({"a": 12}, successor_depth=3, ratio=0.5)


@pytest.mark.parametrize("groups, words", [
    ([[0, 1], [1, 2], [3]], "overlaps"),
    ([[0, 1], [3]], "skips block 2"),
    ([[2, 3], [0, 1]], "skips block 0"),
    ([[0, 2], [1, 3]], "consecutive"),
    ([[0, 1], [2]], "in no group"),
])
def test_bad_explicit_groups(groups, words):
    with pytest.raises(PlanError, match=words):
        check_groups("encoder.layer", 4, groups)
