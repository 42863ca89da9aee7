"""Pipeline parallelism: stage-to-stage activation exchange and the micro-batch schedules
(no pipelining, 1F1B, interleaved 1F1B), as in Megatron-Core."""

from moecore.pipeline_parallel.interleaved import forward_backward_pipelining_with_interleaving
from moecore.pipeline_parallel.layout import pipeline_layer_layout, stage_num_layers
from moecore.pipeline_parallel.p2p import P2PCommunicator, get_tensor_shape
from moecore.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
    make_data_iterators,
)

__all__ = [
    "P2PCommunicator",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "get_forward_backward_func",
    "get_tensor_shape",
    "make_data_iterators",
    "pipeline_layer_layout",
    "stage_num_layers",
]
