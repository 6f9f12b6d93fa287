"""The HIS simulator's configuration (``his-sim.yaml``), parsed into frozen dataclasses.

Every key is documented here (``metadata['doc']``); ``config/his-sim.example.yaml`` shows them all.
Loading goes through :mod:`gateway.config.schema`: unknown keys are errors and every problem is reported
at once with file, line, column and key path.
"""

from __future__ import annotations

import zoneinfo
import dataclasses
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Literal, Optional

from gateway.config.fields import Duration, Port, Range, doc
from gateway.config.schema import load

from hissim.inventory import Schedule, parse_session


@dataclass(frozen=True)
class ServiceConfig:
    code: str = doc("Service code (AIS-3.1), e.g. 'cardiology-consult'; becomes Slot.serviceType.")
    text: str = doc("Service display text (AIS-3.2), e.g. '心内科门诊'.")


@dataclass(frozen=True)
class DoctorConfig:
    id: str = doc("Doctor id; also the schedule id (SCH-5.1, ARQ-5, AIP-3.1).")
    family: str = doc("Family name (AIP-3.2).")
    given: str = doc("Given name (AIP-3.3).")
    service: ServiceConfig = doc("The service this doctor's slots offer.")
    sessions: list[str] = doc("Daily sessions, each 'HH:MM-HH:MM' (local time), e.g. ['08:00-12:00'].")
    slot_minutes: Annotated[int, Range(1, 1440)] = doc("Length of one slot, minutes.", default=15)
    held: bool = doc(
        "Hold this doctor's slots back: not opened (nor published) at start, but all at once when the "
        "simulator is told to release them (SIGHUP): opened in one transaction, one SIU^S24 each in start order "
        "(the slot-release rush of a famous doctor, bench/rush.py).",
        default=False,
    )

    def __post_validate__(self):
        issues = []
        for i, text in enumerate(self.sessions):
            try:
                parse_session(text)
            except ValueError as exc:
                issues.append((f"sessions[{i}]", str(exc)))
        return issues


@dataclass(frozen=True)
class DepartmentConfig:
    code: str = doc("Department code (AIL-3.1).")
    name: str = doc("Department name (AIL-3.9).")
    doctors: list[DoctorConfig] = doc("The department's doctors, each with one schedule.")


@dataclass(frozen=True)
class GatewayAddress:
    host: str = doc("Host of the gateway's inner MLLP listener.", default="127.0.0.1")
    port: Port = doc("Port of the gateway's inner MLLP listener.", default=2575)


@dataclass(frozen=True)
class PharmacyConfig:
    listen: str = doc(
        "Twisted endpoint where the gateway sends RDE^O11 / OMP^O09 (a hospital's pharmacy system is often "
        "a machine of its own), e.g. 'tcp:2577:interface=127.0.0.1'; port 0 picks a free port (the "
        "'his-sim.pharmacy-listening' log line names it).",
        default="tcp:2577:interface=127.0.0.1",
    )
    application: str = doc("MSH-3 of the pharmacy's messages (answers, RDS^O13, released RDE^O11).",
                           default="HIS-PHARMACY")
    out_of_stock: list[str] = doc(
        "Drug codes (RXE-2.1 / RXO-1.1) the pharmacy has none of: an item with one is answered ORC-1 UA, "
        "and the order MSA AE with an ERR naming it.",
        default_factory=list,
    )
    dispense_delay: Duration = doc(
        "How long after accepting an order (MSA AA) the pharmacy sends its RDS^O13 to the gateway.",
        default=Duration(2.0),
    )
    release_every: Duration = doc(
        "Release a random prescription to outside pharmacies (RDE^O11, ORC-16 RELEASE) this often; "
        "0 = never (SIGUSR2 releases one at once either way).",
        default=Duration(0.0),
    )
    charset: Optional[Literal["utf-8", "gb18030"]] = doc(
        "Encoding of the pharmacy's messages; null = the simulator's charset.", default=None
    )


@dataclass(frozen=True)
class HisSimConfig:
    departments: list[DepartmentConfig] = doc("Departments and their doctors; each doctor has one schedule.")
    listen: str = doc(
        "Twisted endpoint where the gateway sends SRM / SQM, e.g. 'tcp:2576:interface=127.0.0.1' "
        "(port 0 picks a free port; the 'his-sim.listening' log line names it).",
        default="tcp:2576:interface=127.0.0.1",
    )
    gateway: GatewayAddress = doc("Where this HIS pushes SIU notifications.", default_factory=GatewayAddress)
    publish: Literal["push", "none"] = doc(
        "push: send SIU^S24 for every slot it opens (at the first start all of them; after a restart only slots "
        "new to its store) and SIU^S12/S15 on changes; "
        "none: only answer SQM^S25 queries (the gateway polls).",
        default="push",
    )
    charset: Literal["utf-8", "gb18030"] = doc(
        "Encoding of the messages this HIS sends (MSH-18 set accordingly).", default="utf-8"
    )
    msh18_empty: bool = doc(
        "Leave MSH-18 empty even though the text is not ASCII, like many Chinese HIS.", default=False
    )
    hl7_version: Literal["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6"] = doc(
        "MSH-12 of the messages this HIS sends.", default="2.5"
    )
    application: str = doc("MSH-3 of the messages this HIS sends.", default="HIS")
    facility: str = doc("MSH-4 of the messages this HIS sends.", default="HOSPITAL")
    gateway_application: str = doc("MSH-5 of the notifications pushed to the gateway.", default="GATEWAYD")
    gateway_facility: str = doc("MSH-6 of the notifications pushed to the gateway.", default="FRONT")
    timezone: str = doc("Time zone of the hospital's local date/times.", default="Asia/Shanghai")
    received_log: Path = doc(
        "JSON-lines log of every message received (relative to this config file).",
        default=Path("his-received.jsonl"),
    )
    sent_log: Path = doc(
        "JSON-lines log of every notification sent (relative to this config file).",
        default=Path("his-sent.jsonl"),
    )
    store: Optional[str] = doc(
        "SQLite file where this HIS keeps what a real HIS keeps across a restart: its slots, every booking and "
        "who made it, the next appointment id, the answers it gave, the messages the gateway has not "
        "acknowledged yet and the pharmacy's accepted orders (relative to this config file; one store per "
        "simulator). ':memory:' keeps nothing: every start is a new hospital. null = the config file's name "
        "with '.sqlite3', next to it (his-sim.yaml -> his-sim.sqlite3).",
        default=None,
    )
    days: Annotated[int, Range(1, 366)] = doc("Slots from start_date for this many days.", default=7)
    start_date: Optional[str] = doc(
        "First day of slots, YYYY-MM-DD; null = today (local date in timezone).", default=None
    )
    counter_bookings_per_minute: Annotated[float, Range(0, 6000)] = doc(
        "The hospital's own counter books random free future slots at this average rate (0 = never).",
        default=2.0,
    )
    seed: Optional[int] = doc("Random seed, for reproducible counter bookings; null = random.", default=None)
    ack_timeout: Duration = doc(
        "How long to wait for the gateway's ACK before a notification is resent (same MSH-10).",
        default=Duration(10.0),
    )
    retry_initial: Duration = doc("First delay before a resend; doubles up to retry_max.", default=Duration(0.5))
    retry_max: Duration = doc("Longest delay between resends.", default=Duration(10.0))
    connect_timeout: Duration = doc("TCP connect timeout towards the gateway.", default=Duration(5.0))
    max_message_bytes: Annotated[int, Range(1024, 64 << 20)] = doc(
        "Largest HL7 message accepted from the gateway.", default=1 << 20
    )
    idle_timeout: Duration = doc("An idle MLLP connection from the gateway is closed after this.",
                                 default=Duration(300.0))
    max_connections: Annotated[int, Range(1, 1000)] = doc("Most simultaneous MLLP connections.", default=16)
    pharmacy: Optional[PharmacyConfig] = doc(
        "Also play the hospital's pharmacy system (docs/prescriptions.md section 6); left out: no pharmacy.",
        default=None,
    )

    def __post_validate__(self):
        issues = []
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            issues.append(("timezone", f"unknown time zone {self.timezone!r} (use e.g. Asia/Shanghai)"))
        if self.start_date is not None:
            try:
                date.fromisoformat(self.start_date)
            except ValueError:
                issues.append(("start_date", f"{self.start_date!r} is not a date YYYY-MM-DD"))
        seen: dict[str, str] = {}
        for d, department in enumerate(self.departments):
            for i, doctor in enumerate(department.doctors):
                key = f"departments[{d}].doctors[{i}].id"
                if doctor.id in seen:
                    issues.append((key, f"doctor id {doctor.id!r} is also used at {seen[doctor.id]}"))
                else:
                    seen[doctor.id] = key
        if not seen:
            issues.append(("departments", "at least one doctor is needed"))
        return issues

    # -- derived -------------------------------------------------------------------------------

    @property
    def codec(self) -> str:
        return "gb18030" if self.charset == "gb18030" else "utf-8"

    @property
    def pharmacy_codec(self) -> str:
        charset = self.pharmacy.charset if self.pharmacy is not None else None
        return "gb18030" if (charset or self.charset) == "gb18030" else "utf-8"

    def held_schedules(self) -> frozenset[str]:
        """The ids of the doctors whose slots are held back until released (``held``)."""
        return frozenset(d.id for department in self.departments for d in department.doctors if d.held)

    def schedules(self) -> list[Schedule]:
        """One schedule per doctor, in config order."""
        schedules = []
        for department in self.departments:
            for doctor in department.doctors:
                schedules.append(
                    Schedule(
                        id=doctor.id,
                        family=doctor.family,
                        given=doctor.given,
                        department_code=department.code,
                        department_name=department.name,
                        service_code=doctor.service.code,
                        service_text=doctor.service.text,
                        slot_minutes=doctor.slot_minutes,
                        sessions=tuple(parse_session(s) for s in doctor.sessions),
                    )
                )
        return schedules


def load_config(path: str | Path) -> HisSimConfig:
    """Load and validate the simulator's YAML config; raises ConfigError listing every problem."""
    config = load(path, HisSimConfig)
    return with_paths_relative_to(config, Path(path).absolute())


def with_paths_relative_to(config: HisSimConfig, config_file: Path) -> HisSimConfig:
    """The config with its log and store paths made absolute against the directory of ``config_file`` (defaults
    are not resolved by the loader, explicit relative log paths already are); no store named: the config file's
    own name with '.sqlite3'."""
    base_dir = config_file.parent
    if config.store is None:
        store = str(config_file.with_suffix(".sqlite3"))
    elif config.store == ":memory:":
        store = config.store
    else:
        store = str(base_dir / Path(config.store).expanduser())
    return dataclasses.replace(
        config,
        received_log=base_dir / config.received_log,
        sent_log=base_dir / config.sent_log,
        store=store,
    )
