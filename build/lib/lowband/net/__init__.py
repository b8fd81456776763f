"""The network: units, per-worker links, alpha-beta collective costs (used by the emulation).

Issue #6 adds real shaped links (netns + tc), topology costs, the scale simulator and planner.
"""
