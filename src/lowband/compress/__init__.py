"""What a tensor becomes on the wire. Pure: no process group inside (issue #3 fills this layer).

Contract (see ``shared/DESIGN.md``): a ``Compressor`` has ``encode(x) -> Payload`` and
``decode(payload) -> Tensor``; a ``Payload`` holds the tensors that cross the wire and a
local context that never does, and its ``nbytes`` is the exact byte count the ledger
charges. Each compressor declares whether payloads can be summed in an all-reduce or must
be all-gathered; compressors register by name in a ``lowband.registry.Registry``.
"""
