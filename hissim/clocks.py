"""Hospital local time from an injected Twisted clock (``IReactorTime``): no hidden time anywhere."""

from __future__ import annotations

from datetime import datetime, tzinfo

from twisted.internet.interfaces import IReactorTime


class HospitalClock:
    """Reads ``clock.seconds()`` and gives hospital-local times."""

    def __init__(self, clock: IReactorTime, tz: tzinfo) -> None:
        self.clock = clock
        self.tz = tz

    def aware(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), self.tz)

    def local(self) -> datetime:
        """Now as a naive local datetime, like every slot time (HL7 DTMs carry no offset)."""
        return self.aware().replace(tzinfo=None)

    def iso(self) -> str:
        """Now as ISO 8601 with the offset, for journal lines."""
        return self.aware().isoformat(timespec="milliseconds")

    def to_local(self, value: datetime) -> datetime:
        """A parsed DTM as naive local time: an offset, if any, is converted to the hospital's zone."""
        if value.tzinfo is None:
            return value
        return value.astimezone(self.tz).replace(tzinfo=None)
