"""Rank layout of every group kind, checked as a pure function at world sizes up to 1024."""

import itertools

import pytest

from moecore import parallel_state as ps
from moecore.parallel_state import ParallelSizes, all_rank_groups, generate_rank_groups


def _layouts():
    """(world, tp, pp, cp, ep, etp) combinations that are valid, up to 1024 ranks."""
    out = []
    for world in (1, 2, 4, 8, 16, 64, 128, 1024):
        for tp, pp, cp, ep, etp in itertools.product((1, 2, 4, 8), (1, 2, 4), (1, 2), (1, 2, 8),
                                                     (None, 1, 2)):
            try:
                s = ParallelSizes(world_size=world, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp)
            except ValueError:
                continue
            out.append(s)
    return out


LAYOUTS = _layouts()


def _assert_partition(groups, world):
    flat = sorted(r for g in groups for r in g)
    assert flat == list(range(world)), "groups must cover every rank exactly once"
    sizes = {len(g) for g in groups}
    assert len(sizes) == 1, f"groups of one kind must have one size, got {sizes}"


@pytest.mark.parametrize("order", ["tp-cp-ep-dp-pp", "tp-pp-cp-ep-dp"])
def test_every_group_kind_partitions_the_world(order):
    checked = 0
    for s in LAYOUTS:
        if order != ps.DEFAULT_ORDER and s.expert_tp != s.tp:
            continue
        s = ParallelSizes(s.world_size, s.tp, s.pp, s.cp, s.ep, s.etp, order)
        groups = all_rank_groups(s)
        for kind, g in groups.items():
            if kind == "embedding":
                continue
            _assert_partition(g, s.world_size)
        w = s.world_size
        assert len(groups["tensor_model_parallel"][0]) == s.tp
        assert len(groups["pipeline_model_parallel"][0]) == s.pp
        assert len(groups["data_parallel"][0]) == s.dp
        assert len(groups["context_parallel"][0]) == s.cp
        assert len(groups["expert_model_parallel"][0]) == s.ep
        assert len(groups["expert_tensor_parallel"][0]) == s.expert_tp
        assert len(groups["expert_data_parallel"][0]) == s.edp
        assert s.tp * s.cp * s.dp * s.pp == w
        assert s.expert_tp * s.ep * s.edp * s.pp == w
        checked += 1
    assert checked > 50


def test_tp_ranks_are_contiguous_in_default_order():
    for s in LAYOUTS:
        for g in all_rank_groups(s)["tensor_model_parallel"]:
            assert g == list(range(g[0], g[0] + s.tp))


def test_expert_groups_consistent_with_dense_groups():
    for s in LAYOUTS:
        g = all_rank_groups(s)
        # Every pipeline stage holds the same ranks in the dense and expert views.
        stage_dense = {frozenset(x) for x in generate_rank_groups(
            s.world_size, s.dense_sizes(), s.order, "tp-cp-dp")}
        stage_expert = {frozenset(x) for x in g["expert_tensor_and_model_parallel"]}
        for eg in stage_expert:
            assert any(eg <= sd for sd in stage_dense)
        # An expert-parallel group never spans two pipeline stages.
        stage_of = {r: i for i, grp in enumerate(stage_dense) for r in grp}
        for ep_group in g["expert_model_parallel"]:
            assert len({stage_of[r] for r in ep_group}) == 1
        # With ETP == TP, expert-tensor groups are exactly the tensor groups.
        if s.expert_tp == s.tp:
            assert g["expert_tensor_parallel"] == g["tensor_model_parallel"]


def test_embedding_group_is_first_and_last_stage():
    s = ParallelSizes(world_size=8, tp=2, pp=4)
    g = all_rank_groups(s)
    assert g["pipeline_model_parallel"][0] == [0, 2, 4, 6]
    assert g["embedding"][0] == [0, 6]


def test_known_layout_world16():
    s = ParallelSizes(world_size=16, tp=2, pp=2, ep=2)
    g = all_rank_groups(s)
    assert g["data_parallel"][0] == [0, 2, 4, 6]
    assert g["expert_model_parallel"][0] == [0, 2]
    assert g["expert_data_parallel"][0] == [0, 4]
    assert g["pipeline_model_parallel"][0] == [0, 8]


def test_context_parallel_groups():
    s = ParallelSizes(world_size=8, tp=2, cp=2)
    g = all_rank_groups(s)
    assert g["context_parallel"][0] == [0, 2]
    assert g["data_parallel"][0] == [0, 4]
    assert g["data_parallel_with_cp"][0] == [0, 2, 4, 6]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(world_size=6, tp=4), "not divisible"),
        (dict(world_size=8, tp=2, ep=8), "expert_model_parallel_size (8)"),
        (dict(world_size=8, tp=0), ">= 1"),
        (dict(world_size=8, order="tp-dp-pp"), "unknown parallel order"),
        (dict(world_size=8, order="tp-cp-ep-dp-xx"), "unknown parallel order"),
    ],
)
def test_bad_sizes_raise_clear_errors(kwargs, needle):
    with pytest.raises(ValueError, match=None) as e:
        ParallelSizes(**kwargs)
    assert needle in str(e.value)


def test_pp_inside_order_requires_equal_expert_tp():
    s = ParallelSizes(world_size=8, tp=2, pp=2, ep=2, etp=1, order="tp-pp-cp-ep-dp")
    with pytest.raises(ValueError, match="put 'pp' last"):
        all_rank_groups(s)


def test_initialize_twice_and_single_state():
    ps.destroy_model_parallel()
    state = ps.initialize_model_parallel()
    assert ps.model_parallel_is_initialized()
    assert ps.get_tensor_model_parallel_world_size() == 1
    assert ps.get_expert_data_parallel_world_size() == 1
    assert state.tp_group is None
    with pytest.raises(ValueError, match="already called"):
        ps.initialize_model_parallel()
    ps.destroy_model_parallel()
    assert not ps.model_parallel_is_initialized()
    with pytest.raises(ValueError, match="multiply to 1"):
        generate_rank_groups(2, {"tp": 1}, ps.DEFAULT_ORDER, "tp")


def test_initialize_with_sizes_not_matching_world():
    ps.destroy_model_parallel()
    with pytest.raises(ValueError, match="tensor_model_parallel_size \\(2\\)"):
        ps.initialize_model_parallel(tensor_model_parallel_size=2)
    assert not ps.model_parallel_is_initialized()
