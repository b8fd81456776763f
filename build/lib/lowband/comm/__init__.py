"""Communication: collectives over torch.distributed, a byte ledger, emulated link delays."""

from lowband.comm.comm import Comm, Handle
from lowband.comm.ledger import Ledger, Record

__all__ = ["Comm", "Handle", "Ledger", "Record"]
