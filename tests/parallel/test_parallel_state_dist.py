"""Process groups built on a real gloo world: each group's collectives reach exactly its ranks."""

import torch
import torch.distributed as dist

from moecore import parallel_state as ps
from tests.dist_harness import run_distributed


def _check_groups(rank, world_size):
    state = ps.initialize_model_parallel(tensor_model_parallel_size=2,
                                         expert_model_parallel_size=2)
    assert state.tp_size == 2 and state.dp_size == 2 and state.ep_size == 2
    assert state.edp_size == 1
    assert ps.get_tensor_model_parallel_rank() == rank % 2
    for kind in ("tensor_model_parallel", "data_parallel", "expert_model_parallel",
                 "expert_data_parallel", "embedding"):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=state.group(kind))
        assert t.item() == sum(state.ranks[kind]), (kind, t.item(), state.ranks[kind])
    try:
        ps.initialize_model_parallel()
    except ValueError as e:
        assert "already called" in str(e)
    else:
        raise AssertionError("second initialize must fail")
    return state.ranks["data_parallel"]


def test_groups_on_gloo_world_of_4():
    out = run_distributed(_check_groups, 4)
    assert out[0] == [0, 2] and out[1] == [1, 3]
