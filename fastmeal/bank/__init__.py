"""The soft-label bank: run the teachers once over every planned crop, then train students from stored top-K.

* :mod:`fastmeal.bank.store` — the on-disk format (records, epoch files, manifest, chunks) and its reader;
* :mod:`fastmeal.bank.build` — ``fastmeal bank build``;
* :mod:`fastmeal.bank.replay` — the train loader that adds each crop's record (``bank.path``).
"""

from fastmeal.bank.store import BankError, BankReader

__all__ = ["BankError", "BankReader"]
