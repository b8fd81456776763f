"""What a worker remembers between rounds: error feedback (issue #3 fills this layer).

Contract: ``compensate(name, x) -> x'`` before encoding and ``update(name, x', decoded)``
after; state keyed by parameter name so it survives re-bucketing, checkpoints and
membership changes, and saved by ``state_dict()``.
"""
