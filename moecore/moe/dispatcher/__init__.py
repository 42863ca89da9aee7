"""Token dispatchers: all-gather, all-to-all and intra-node IPC (``moe_token_dispatcher_type``)."""

from moecore.moe.dispatcher.allgather import MoEAllGatherTokenDispatcher
from moecore.moe.dispatcher.alltoall import MoEAlltoAllTokenDispatcher
from moecore.moe.dispatcher.base import MoETokenDispatcher
from moecore.moe.dispatcher.ipc import MoEIPCTokenDispatcher

DISPATCHERS = {
    "allgather": MoEAllGatherTokenDispatcher,
    "alltoall": MoEAlltoAllTokenDispatcher,
    "ipc": MoEIPCTokenDispatcher,
}

__all__ = ["MoETokenDispatcher", "MoEAllGatherTokenDispatcher", "MoEAlltoAllTokenDispatcher",
           "MoEIPCTokenDispatcher", "DISPATCHERS"]
