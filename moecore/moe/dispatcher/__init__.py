"""Token dispatchers: all-gather, all-to-all and intra-node IPC (``moe_token_dispatcher_type``).

Each ``dispatch`` returns a frozen handle of its own type that ``combine`` consumes."""

from moecore.moe.dispatcher.allgather import AllGatherHandle, MoEAllGatherTokenDispatcher
from moecore.moe.dispatcher.alltoall import AlltoAllHandle, MoEAlltoAllTokenDispatcher
from moecore.moe.dispatcher.base import MoETokenDispatcher
from moecore.moe.dispatcher.ipc import IPCHandle, MoEIPCTokenDispatcher

DISPATCHERS = {
    "allgather": MoEAllGatherTokenDispatcher,
    "alltoall": MoEAlltoAllTokenDispatcher,
    "ipc": MoEIPCTokenDispatcher,
}

__all__ = ["MoETokenDispatcher", "MoEAllGatherTokenDispatcher", "MoEAlltoAllTokenDispatcher",
           "MoEIPCTokenDispatcher", "AllGatherHandle", "AlltoAllHandle", "IPCHandle",
           "DISPATCHERS"]
