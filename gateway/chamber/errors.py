"""Errors the gates may need to tell apart, without importing the store that raises them."""


class ChamberError(Exception):
    """The chamber cannot be opened or written."""


class ChamberWriteError(ChamberError):
    """A commit failed (disk full, read-only file, ...): the batch it carried was not recorded."""


class ChamberClaimed(ChamberError):
    """Another process runs this gate on the chamber (PostgreSQL: it holds the gate's claim in the database)."""

    def __init__(self, role: str, chamber: str, holder: str):
        self.role, self.chamber, self.holder = role, chamber, holder
        super().__init__(f"the {role} gate of the chamber {chamber} is already run by {holder}. One chamber serves "
                         f"one gateway, or one outer and one inner process of the split lock (docs/chamber.md): stop "
                         f"that process first, or give this one its own chamber")
