"""Sweeps of runs (``lowband bench``: algorithms x networks x seeds, resumable) and the peers they
are compared with (torch's DDP hooks, torchft); reports come from :mod:`lowband.report`."""
