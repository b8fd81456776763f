"""Surviving the network: membership and quorum, checkpoint/resume, guards (issue #7).

Every algorithm already exposes ``state_dict()/load_state_dict()`` covering its
communication state (``lowband.algorithms.base.Algorithm``); this layer will save them
atomically, agree on membership through the torch.distributed store, and guard updates.
"""
