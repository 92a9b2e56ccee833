"""Property tests: any valid target gives a plan that partitions the blocks as asked."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from theseus_general import Theseus
from theseus_general.plan import check_groups, resolve_depths, split_evenly

from conftest import ChainModel

FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _assert_partition(groups, num_blocks):
    flat = [b for g in groups for b in g]
    assert flat == list(range(num_blocks))  # every block once, in order
    assert all(list(g) == list(range(g[0], g[-1] + 1)) for g in groups)  # contiguous


@FAST
@given(st.integers(1, 48).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_split_evenly_partitions(case):
    n, depth = case
    groups = split_evenly(n, depth)
    assert len(groups) == depth
    _assert_partition(groups, n)
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@FAST
@given(st.lists(st.integers(1, 12), min_size=1, max_size=5), st.data())
def test_depth_and_ratio_targets_give_valid_depths(sizes_list, data):
    sizes = {f"c{i}": n for i, n in enumerate(sizes_list)}
    total = sum(sizes_list)
    if total < 2 or total - 1 < len(sizes):
        return
    depth = data.draw(st.integers(len(sizes), total - 1))
    depths = resolve_depths(sizes, successor_depth=depth)
    assert sum(depths.values()) == depth
    assert all(1 <= depths[p] <= sizes[p] for p in sizes)
    ratio = data.draw(st.floats(0.05, 0.95))
    try:
        by_ratio = resolve_depths(sizes, ratio=ratio)
    except ValueError as error:
        rounds_to_zero = any(n * ratio <= 0.5 + 1e-9 for n in sizes_list)
        assert ("leaves no block" in str(error)) if rounds_to_zero else ("keeps every block" in str(error))
    else:
        assert all(1 <= by_ratio[p] <= sizes[p] for p in sizes) and sum(by_ratio.values()) < total
        # nearest whole block, halves down
        assert all(abs(by_ratio[p] - sizes[p] * ratio) <= 0.5 + 1e-9 for p in sizes)


@FAST
@given(st.integers(2, 16).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(1, n), min_size=1, max_size=n))))
def test_explicit_groups_are_accepted_exactly_when_they_partition(case):
    n, cuts = case
    bounds = sorted(set(c for c in cuts if c < n)) + [n]
    groups, start = [], 0
    for b in bounds:
        groups.append(list(range(start, b)))
        start = b
    _assert_partition(check_groups("c", n, groups), n)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(2, 10).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1))))
def test_engine_plan_and_export_depth_match_the_target(case):
    n, depth = case
    model = ChainModel(depth=n, width=4)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=depth, validate=False)
    groups = [g.blocks for g in th.plan.groups]
    assert len(groups) == depth
    _assert_partition(groups, n)
    exported = th.export()
    assert len(exported.blocks) == depth
    th.model.eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(th.model(x), exported(x))
    th.unwrap()
    assert len(model.blocks) == n
