"""Errors the gates may need to tell apart, without importing the store that raises them."""


class ChamberError(Exception):
    """The chamber cannot be opened or written."""


class ChamberWriteError(ChamberError):
    """A commit failed (disk full, read-only file, ...): the batch it carried was not recorded."""
