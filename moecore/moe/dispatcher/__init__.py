"""Token dispatchers: all-gather and all-to-all (``moe_token_dispatcher_type``)."""

from moecore.moe.dispatcher.allgather import MoEAllGatherTokenDispatcher
from moecore.moe.dispatcher.alltoall import MoEAlltoAllTokenDispatcher
from moecore.moe.dispatcher.base import MoETokenDispatcher

DISPATCHERS = {
    "allgather": MoEAllGatherTokenDispatcher,
    "alltoall": MoEAlltoAllTokenDispatcher,
}

__all__ = ["MoETokenDispatcher", "MoEAllGatherTokenDispatcher", "MoEAlltoAllTokenDispatcher",
           "DISPATCHERS"]
