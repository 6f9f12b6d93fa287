"""The simulated hospital's slot book: schedules, slots and bookings.

Pure domain code: no I/O, no clock. Every method that depends on time takes ``now`` (a naive datetime
in hospital local time, like every datetime here: HL7 DTMs in the profile carry no offset).

A slot is identified by (schedule id, start). Its state is open, booked (with the HIS appointment id
``H<6 digits>`` and who booked it: ``'counter'`` or the gateway's placer appointment id) or blocked.

The inventory lives in memory; `hissim.store` keeps it on disk. Every change since the last `settle` is
remembered with the slot as it was before (`changes`), so the store can write exactly what changed and, when
its transaction fails, `discard_changes` puts the inventory back as it was: what the HIS knows is what it has
committed.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

COUNTER = "counter"


class InventoryError(Exception):
    """Base of the inventory's refusals; ``str()`` is the text the HIS answers with."""


class UnknownSlot(InventoryError):
    pass


class SlotNotOpen(InventoryError):
    pass


class UnknownBooking(InventoryError):
    pass


class NotTheSameBooking(UnknownBooking):
    """The placer id names one booking and the HIS appointment id given with it another (or none)."""


class SlotStatus(enum.Enum):
    """Slot state, valued as the SCH-25 filler status the profile uses."""

    OPEN = "Open"
    BOOKED = "Booked"
    BLOCKED = "Blocked"


@dataclass(frozen=True)
class Schedule:
    """A doctor's bookable calendar (schedule id = doctor id) and what it offers."""

    id: str
    family: str
    given: str
    department_code: str
    department_name: str
    service_code: str
    service_text: str
    slot_minutes: int
    sessions: tuple[tuple[time, time], ...] = ()

    @property
    def display_name(self) -> str:
        return f"{self.family}{self.given}"


@dataclass(frozen=True)
class Booking:
    appointment_id: str
    schedule_id: str
    start: datetime
    by: str
    placer_id: str | None = None
    tentative: bool = False  # a hold (SRM^S01 with ARQ-8 Tentative), until confirmed or cancelled


@dataclass(frozen=True)
class Slot:
    """A snapshot of one slot; the inventory replaces it on every change."""

    schedule: Schedule
    start: datetime
    minutes: int
    status: SlotStatus = SlotStatus.OPEN
    booking: Booking | None = None

    @property
    def key(self) -> tuple[str, datetime]:
        return (self.schedule.id, self.start)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.minutes)


def parse_session(text: str) -> tuple[time, time]:
    """``"08:00-12:00"`` -> (08:00, 12:00); ValueError if malformed or empty."""
    try:
        first, last = (part.strip() for part in text.split("-"))
        begin = datetime.strptime(first, "%H:%M").time()
        end = datetime.strptime(last, "%H:%M").time()
    except ValueError:
        raise ValueError(f"session {text!r} is not HH:MM-HH:MM") from None
    if end <= begin:
        raise ValueError(f"session {text!r} ends before it starts")
    return begin, end


def session_starts(day: date, session: tuple[time, time], minutes: int) -> list[datetime]:
    """Slot starts of one session on one day: only slots that end within the session."""
    start = datetime.combine(day, session[0])
    end = datetime.combine(day, session[1])
    step = timedelta(minutes=minutes)
    starts = []
    while start + step <= end:
        starts.append(start)
        start += step
    return starts


@dataclass(frozen=True)
class Changes:
    """What changed since the last `Inventory.settle`: the slots as they are now, the bookings that ended
    (cancelled, or a hold released) and the next HIS appointment number."""

    slots: list[Slot]
    ended: list[Booking]
    next_appointment_number: int


class Inventory:
    """All slots of all schedules, and the bookings on them."""

    def __init__(self, slots: Iterable[Slot], *, next_appointment_number: int = 1) -> None:
        self._slots: dict[tuple[str, datetime], Slot] = {}
        self._schedules: dict[str, Schedule] = {}
        self._by_appointment: dict[str, tuple[str, datetime]] = {}
        self._by_placer: dict[str, tuple[str, datetime]] = {}
        for slot in slots:
            self._put(slot)
        self._next_number = next_appointment_number
        #: slot key -> the slot before the first change since the last settle (None: the slot is new)
        self._before: dict[tuple[str, datetime], Slot | None] = {}
        self._settled_number = next_appointment_number

    @classmethod
    def build(cls, schedules: Sequence[Schedule], first_day: date, days: int) -> Inventory:
        """Every slot of every schedule's sessions on ``days`` days from ``first_day``, all open."""
        slots = []
        for offset in range(days):
            day = first_day + timedelta(days=offset)
            for schedule in schedules:
                for session in schedule.sessions:
                    for start in session_starts(day, session, schedule.slot_minutes):
                        slots.append(Slot(schedule, start, schedule.slot_minutes))
        return cls(slots)

    # -- reading -----------------------------------------------------------------------------

    def schedules(self) -> list[Schedule]:
        return list(self._schedules.values())

    def slots(self, start_from: datetime | None = None, until: datetime | None = None) -> list[Slot]:
        """Slots whose start is within [start_from, until] (either bound may be None), in start order."""
        chosen = [
            slot
            for slot in self._slots.values()
            if (start_from is None or slot.start >= start_from) and (until is None or slot.start <= until)
        ]
        chosen.sort(key=lambda s: (s.start, s.schedule.id))
        return chosen

    def open_slots(self) -> list[Slot]:
        return [slot for slot in self.slots() if slot.status is SlotStatus.OPEN]

    def slot(self, schedule_id: str, start: datetime) -> Slot:
        try:
            return self._slots[(schedule_id, start)]
        except KeyError:
            raise UnknownSlot("no such slot") from None

    def booking(self, *, appointment_id: str | None = None, placer_id: str | None = None) -> Booking:
        """The live booking the placer id names, checked against the HIS appointment id when both are given
        (`NotTheSameBooking` when they name different bookings); with the appointment id alone, the booking
        it names (the hospital's own, e.g. a counter booking). UnknownBooking when there is none."""
        if placer_id:
            key = self._by_placer.get(placer_id)
        elif appointment_id:
            key = self._by_appointment.get(appointment_id)
        else:
            key = None
        if key is None:
            raise UnknownBooking("no such appointment")
        booking = self._slots[key].booking
        assert booking is not None
        if placer_id and appointment_id and booking.appointment_id != appointment_id:
            raise NotTheSameBooking("the placer and filler appointment ids name different appointments")
        return booking

    @property
    def next_appointment_number(self) -> int:
        return self._next_number

    # -- changing ----------------------------------------------------------------------------

    def book(self, schedule_id: str, start: datetime, by: str, placer_id: str | None = None,
             tentative: bool = False) -> Booking:
        """Book an open slot (``tentative``: hold it for that placer); returns the booking with its new HIS
        appointment id.

        Raises UnknownSlot, or SlotNotOpen when the slot is booked or blocked.
        """
        slot = self.slot(schedule_id, start)
        if slot.status is SlotStatus.BOOKED:
            raise SlotNotOpen("slot already booked")
        if slot.status is SlotStatus.BLOCKED:
            raise SlotNotOpen("slot blocked")
        booking = Booking(
            appointment_id=f"H{self._next_number:06d}",
            schedule_id=schedule_id,
            start=start,
            by=by,
            placer_id=placer_id,
            tentative=tentative,
        )
        self._next_number += 1
        self._change(dataclasses.replace(slot, status=SlotStatus.BOOKED, booking=booking))
        return booking

    def confirm(self, booking: Booking) -> Booking:
        """A tentative booking becomes a booking (the placer's ordinary SRM^S01 for the slot it holds)."""
        confirmed = dataclasses.replace(booking, tentative=False)
        key = (booking.schedule_id, booking.start)
        self._change(dataclasses.replace(self._slots[key], booking=confirmed))
        return confirmed

    def move(self, schedule_id: str, start: datetime, *, appointment_id: str | None = None,
             placer_id: str | None = None) -> Booking:
        """Move a booking (found as in :meth:`booking`) to another open slot, keeping its HIS appointment id and
        placer; the old slot opens.  The same slot: nothing changes.  UnknownBooking, UnknownSlot, SlotNotOpen."""
        booking = self.booking(appointment_id=appointment_id, placer_id=placer_id)
        target = self.slot(schedule_id, start)
        if target.key == (booking.schedule_id, booking.start):
            return booking
        if target.status is not SlotStatus.OPEN:
            raise SlotNotOpen(f"slot {target.status.value.lower()}")
        old_key = (booking.schedule_id, booking.start)
        moved = dataclasses.replace(booking, schedule_id=schedule_id, start=start)
        self._change(dataclasses.replace(self._slots[old_key], status=SlotStatus.OPEN, booking=None))
        self._change(dataclasses.replace(target, status=SlotStatus.BOOKED, booking=moved))
        return moved

    def cancel(self, *, appointment_id: str | None = None, placer_id: str | None = None) -> Booking:
        """Cancel the booking found as in :meth:`booking`; the slot opens again."""
        booking = self.booking(appointment_id=appointment_id, placer_id=placer_id)
        key = (booking.schedule_id, booking.start)
        self._change(dataclasses.replace(self._slots[key], status=SlotStatus.OPEN, booking=None))
        return booking

    def block(self, schedule_id: str, start: datetime) -> Slot:
        """Block an open slot (the doctor is away); SlotNotOpen if it is booked."""
        slot = self.slot(schedule_id, start)
        if slot.status is SlotStatus.BOOKED:
            raise SlotNotOpen("slot already booked")
        blocked = dataclasses.replace(slot, status=SlotStatus.BLOCKED)
        self._change(blocked)
        return blocked

    def book_at_counter(self, rng: random.Random, now: datetime) -> Booking | None:
        """The hospital's counter books one random open slot that starts after ``now``; None if none."""
        candidates = [slot for slot in self.open_slots() if slot.start > now]
        if not candidates:
            return None
        slot = rng.choice(candidates)
        return self.book(slot.schedule.id, slot.start, by=COUNTER)

    def add_slots(self, slots: Iterable[Slot]) -> list[Slot]:
        """Add the slots it does not have yet (a schedule published further ahead, a new doctor); the ones it
        has are kept as they are, bookings and all. Returns the slots added."""
        added = [slot for slot in slots if slot.key not in self._slots]
        for slot in added:
            self._change(slot)
        return added

    # -- changes and their settlement ----------------------------------------------------------

    def changes(self) -> Changes:
        """What changed since the last `settle` (see the module docstring)."""
        ended = {}
        for before in self._before.values():
            if before is not None and before.booking is not None:
                ended[before.booking.appointment_id] = before.booking
        for key in self._before:
            booking = self._slots[key].booking
            if booking is not None:
                ended.pop(booking.appointment_id, None)
        return Changes([self._slots[key] for key in self._before], list(ended.values()), self._next_number)

    def settle(self) -> None:
        """The changes are stored: forget what came before them."""
        self._before.clear()
        self._settled_number = self._next_number

    def discard_changes(self) -> None:
        """Back to the state of the last `settle` (the changes could not be stored)."""
        for key in self._before:
            self._unindex(self._slots.pop(key))
        for before in self._before.values():
            if before is not None:
                self._put(before)
        self._before.clear()
        self._next_number = self._settled_number

    def _change(self, slot: Slot) -> None:
        """Replace (or add) one slot, remembering it as it was before the first change since `settle`."""
        current = self._slots.get(slot.key)
        self._before.setdefault(slot.key, current)
        if current is not None:
            self._unindex(current)
        self._put(slot)

    def _put(self, slot: Slot) -> None:
        self._slots[slot.key] = slot
        self._schedules[slot.schedule.id] = slot.schedule
        booking = slot.booking
        if booking is not None:
            self._by_appointment[booking.appointment_id] = slot.key
            if booking.placer_id:
                self._by_placer[booking.placer_id] = slot.key

    def _unindex(self, slot: Slot) -> None:
        booking = slot.booking
        if booking is not None:
            if self._by_appointment.get(booking.appointment_id) == slot.key:
                del self._by_appointment[booking.appointment_id]
            if booking.placer_id and self._by_placer.get(booking.placer_id) == slot.key:
                del self._by_placer[booking.placer_id]
