"""The inner gate's keys (``inner``): the MLLP listener, the HIS endpoints it sends to, their TLS.

Part of :class:`gateway.config.model.GatewayConfig`; documented key by key like every section (``doc``).
"""

from __future__ import annotations

import codecs
import ipaddress
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from gateway.config.fields import Duration, Name, Pattern, Port, Range, ReadableFile, doc
from gateway.config.his_database import HisDatabaseConfig
from gateway.config.his_webservice import HisWebServiceConfig
from gateway.domain.routes import type_allowed


@dataclass(frozen=True)
class MllpListenTls:
    certificate: ReadableFile = doc("The gateway's certificate for the MLLP listener (PEM, with its chain).")
    private_key: ReadableFile = doc("Its private key (PEM).")
    client_ca: ReadableFile = doc("CA that signs the HIS's client certificate; senders without one are refused.")


@dataclass(frozen=True)
class MllpSendTls:
    ca: ReadableFile = doc("CA that signs the HIS's MLLP server certificate.")
    certificate: Optional[ReadableFile] = doc("The gateway's client certificate, if the HIS asks for one.",
                                              default=None)
    private_key: Optional[ReadableFile] = doc("Its private key.", default=None)
    server_name: Optional[str] = doc("The name to check in the HIS's certificate (default: host).", default=None)

    def __post_validate__(self):
        if (self.certificate is None) != (self.private_key is None):
            return [("certificate", "give both certificate and private_key, or neither")]
        return []


@dataclass(frozen=True)
class HisConfig:
    host: Optional[str] = doc("The HIS interface engine's address on the intranet (kind: mllp).", default=None)
    port: Optional[Port] = doc("The HIS's MLLP port, where the gateway sends booking requests (SRM) and queries "
                               "(SQM), or pharmacy orders (RDE/OMP) for a pharmacy endpoint (kind: mllp).",
                               default=None)
    kind: Literal["mllp", "database", "webservice"] = doc(
        "How the gateway talks to this HIS endpoint: 'mllp' = HL7 v2 over MLLP (host, port); 'database' = the "
        "HIS's own database, a view of its slots and an intermediate table for bookings (database); "
        "'webservice' = the HIS vendor's web service, SOAP, or HTTP with JSON or XML (webservice). "
        "docs/his-adapters.md.",
        default="mllp")
    database: Optional[HisDatabaseConfig] = doc("With kind: database, the HIS's database and its tables.",
                                                default=None)
    webservice: Optional[HisWebServiceConfig] = doc("With kind: webservice, the HIS's web service and its calls.",
                                                    default=None)
    name: Name = doc("A short name for this HIS, used in logs and in the chamber.", default="his")
    hl7_version: Literal["2.3", "2.3.1", "2.4", "2.5", "2.5.1"] = doc(
        "HL7 version written in MSH-12 of messages sent to the HIS.", default="2.5"
    )
    charset: str = doc(
        "Charset of messages from this HIS that leave MSH-18 empty, and of messages sent to it "
        "(utf-8, gb18030 for GBK/GB2312/GB18030 HIS, latin-1, ascii).",
        default="utf-8",
    )
    receiving_application: str = doc("MSH-5 of messages sent to the HIS.", default="HIS")
    receiving_facility: str = doc("MSH-6 of messages sent to the HIS.", default="HOSPITAL")
    ack_timeout: Duration = doc(
        "How long to wait for the HIS's ACK before the message is resent (same MSH-10).", default=Duration(10.0)
    )
    connect_timeout: Duration = doc("TCP connect timeout towards the HIS.", default=Duration(5.0))
    retry_initial: Duration = doc("First delay before a resend; doubles up to retry_max.", default=Duration(1.0))
    retry_max: Duration = doc("Longest delay between resends.", default=Duration(60.0))
    slot_source: Literal["push", "poll"] = doc(
        "How the slot book reaches the gateway: 'push' = the HIS sends SIU^S23/S24 (and S12/S15 on changes); "
        "'poll' = the gateway asks with SQM^S25 every poll_interval.",
        default="push",
    )
    poll_interval: Duration = doc("With slot_source: poll, how often to query the HIS.", default=Duration(60.0))
    poll_days: Annotated[int, Range(1, 90)] = doc("With slot_source: poll, how many days ahead to ask for.", default=7)
    cancel_message: Literal["SRM^S04", "SRM^S03"] = doc(
        "The message that cancels a booking at this HIS.", default="SRM^S04"
    )
    reschedule_message: Literal["SRM^S01", "SRM^S03"] = doc(
        "How a booking is moved to another slot at this HIS (IHE $book rescheduling): SRM^S01 = cancel + new "
        "(book the new slot, then cancel the old booking with cancel_message once the HIS accepted); SRM^S03 = "
        "one modification request for the booking (ARQ-1/ARQ-2 name it, ARQ-11 and AIS the new slot), the HIS "
        "moving it in one step.",
        default="SRM^S01",
    )
    hold_appointment_type: Annotated[str, Pattern(r"^[A-Za-z0-9_-]{1,20}$", "a code such as Tentative")] = doc(
        "With outer.hold_at_his: ARQ-8 (appointment type, HL7 table 0277) of the SRM^S01 that holds a slot at this "
        "HIS for an IHE $hold; its $book sends the ordinary SRM^S01 (no ARQ-8) for the same placer id, which "
        "the HIS takes as the confirmation. The HIS's own code if it names tentative bookings otherwise.",
        default="Tentative",
    )
    max_attempts: Annotated[int, Range(1, 1000)] = doc(
        "A message the HIS received but did not answer properly (no ACK within ack_timeout after the send, the "
        "connection lost after it, an unreadable answer) this many times is dead-lettered (see `gatewayd "
        "queue`). Tries that never reached the HIS (connection refused or timed out, TLS handshake failed) are "
        "not attempts: the message waits, tried again every retry_max at most, for as long as the HIS is "
        "unreachable, and an alert is logged once a minute.",
        default=20,
    )
    max_age: Duration = doc(
        "A message the HIS received but did not answer properly is dead-lettered at such an attempt once it is "
        "older than this: counted from its commit, or from the end of the last outage the gateway saw if later "
        "(time the HIS could not be reached never counts, so an outage alone never dead-letters anything). A "
        "message the HIS accepts is delivered whatever its age.",
        default=Duration(3600.0),
    )
    ordering: Literal["fifo", "patient"] = doc(
        "'fifo': messages reach the HIS strictly in the order they were committed, one at a time. 'patient': "
        "in order per patient; another patient's message may pass one that waits for a resend.",
        default="fifo",
    )
    window: Annotated[int, Range(1, 64)] = doc(
        "Messages in flight to this HIS at once (one MLLP connection each); above 1 needs ordering: patient.",
        default=1,
    )
    mllp_release: Annotated[int, Range(1, 2)] = doc(
        "MLLP release towards this HIS: 1, or 2 (it answers commit blocks 0x06/0x15 before its ACK).", default=1
    )
    tls: Optional[MllpSendTls] = doc("TLS (optionally mutual) on the connection to the HIS.", default=None)
    probe_interval: Annotated[Duration, Range(0, 3600)] = doc(
        "How often the inner gate checks this HIS while nothing needs sending: a connection opened (over TLS: "
        "the handshake completed) within connect_timeout and closed, and the heartbeat if set. A failed check "
        "shows the HIS down in /healthz, the metrics and `gatewayd status` at once, and bookings and "
        "prescriptions for it are answered 202 (pending) without waiting answer_within. 0: no probe (an "
        "outage is then noticed only when a message is attempted). Kind database: a SELECT 1 on a pooled "
        "connection within statement_timeout; kind webservice: an HTTP HEAD of url (any answer but 502/503/504 "
        "is up) within timeout.",
        default=Duration(30.0),
    )
    heartbeat: Optional[Annotated[str, Pattern(r"^[A-Z0-9]{3}\^[A-Z0-9]{3}$", "a message type such as NMQ^N01")]] = doc(
        "An application heartbeat on each probe: a message of this type (MSH only, control id P + 19 hex "
        "digits, not stored) sent on a connection of its own; any answer with its MSA-2 within ack_timeout "
        "counts as up (an AR for a type the HIS does not take still proves its application answers). Not set: "
        "the probe only opens a connection. It must be allowed by send_types.",
        default=None,
    )
    send_types: list[Annotated[str, Pattern(r"^[A-Z0-9]{3}(\^([A-Z0-9]{3}|\*))?$", "a message type such as SRM^S01 or SRM^*")]] = doc(
        "Message types allowed out to this HIS; anything else is dead-lettered, never sent.",
        default_factory=lambda: ["SRM^*", "SQM^S25"],
    )
    pass_z_segments: bool = doc(
        "Pass this HIS's Z-segments on to platforms: those of a slot's publication (SIU^S23/S24, SQR^S25 "
        "Open/Blocked) appear on the FHIR Slot as extensions (urn:gatewayd:hl7v2:z-segment, the segment's ER7). "
        "Every platform with Slot.read sees them: turn it on only for Z-segments without patient data (fee, "
        "clinic level). Z-segments of messages about a patient's appointment are never passed on. They are "
        "kept in the chamber's raw copy either way.",
        default=False,
    )
    z_segments: list[Annotated[str, Pattern(r"^Z[A-Z0-9]{2}\|[^\r\n\x0b\x1c]*$",
                                            "an ER7 segment such as 'ZCH|WEB|互联网' (Z, two letters or digits, '|')")]] = doc(
        "Z-segments added to every SRM sent to this HIS (after the standard segments), written as given in "
        "ER7 with | ^ ~ \\ & as delimiters, e.g. the registration channel many HIS expect: ['ZCH|WEB|互联网']. "
        "'{platform}' in one is replaced by the booking platform's name.",
        default_factory=list,
    )

    def __post_validate__(self):
        issues = _charset_issue("charset", self.charset)
        if self.kind == "mllp":
            issues += [(key, f"missing required key {key!r} (kind: mllp)")
                       for key in ("host", "port") if getattr(self, key) is None]
        elif getattr(self, self.kind) is None:
            issues.append((self.kind, f"kind: {self.kind} needs {self.kind} (how to reach the HIS: "
                                      f"docs/his-adapters.md)"))
        elif self.slot_source == "poll":
            issues.append(("slot_source", f"kind: {self.kind} reads slots from {self.kind}.slots; slot_source: "
                                          f"poll sends SQM^S25 over MLLP (leave it at push)"))
        issues += [(other, f"{other} is for kind: {other}; this endpoint's kind is {self.kind}")
                   for other in ("database", "webservice") if other != self.kind and getattr(self, other)]
        if not issues:
            for i, z in enumerate(self.z_segments):
                try:
                    z.encode(self.charset)
                except UnicodeEncodeError:
                    issues.append((f"z_segments[{i}]", f"it cannot be written in this HIS's charset {self.charset}"))
        if self.slot_source == "poll" and not type_allowed("SQM^S25", self.send_types):
            issues.append(("send_types", "slot_source: poll sends SQM^S25: allow it in send_types"))
        if self.reschedule_message == "SRM^S03" and self.cancel_message == "SRM^S03":
            issues.append(("reschedule_message", "this HIS cancels with SRM^S03 (cancel_message): it cannot move "
                                                 "bookings with SRM^S03 too (their answers could not be told "
                                                 "apart); use SRM^S01 (cancel + new)"))
        if self.heartbeat is not None and self.kind != "mllp":
            issues.append(("heartbeat", f"the heartbeat is an HL7 message the probe sends over MLLP: kind: "
                                        f"{self.kind} has none"))
        elif self.heartbeat is not None and not type_allowed(self.heartbeat, self.send_types):
            issues.append(("heartbeat", f"the heartbeat sends {self.heartbeat}: allow it in send_types"))
        if self.heartbeat is not None and self.probe_interval == 0:
            issues.append(("heartbeat", "a heartbeat is sent by the probe: set probe_interval above 0"))
        if self.window > 1 and self.ordering == "fifo":
            issues.append(("window", "strict FIFO sends one message at a time: use window: 1, or ordering: patient"))
        return issues


@dataclass(frozen=True)
class InnerConfig:
    his: HisConfig = doc("The HIS this gate talks to.")
    listen: str = doc(
        "Twisted endpoint where every HIS endpoint sends its messages (SIU notifications; RDS^O13 and released "
        "RDE^O11 from a pharmacy, when accept_types lets them in), e.g. 'tcp:2575:interface=10.1.2.3'.",
        default="tcp:2575:interface=127.0.0.1",
    )
    sending_application: str = doc("MSH-3 of messages and ACKs the gateway sends.", default="GATEWAYD")
    sending_facility: str = doc("MSH-4 of messages and ACKs the gateway sends.", default="FRONT")
    max_message_bytes: Annotated[int, Range(1024, 64 << 20)] = doc(
        "Largest HL7 message accepted; a larger one is refused with a NAK and the connection closed.",
        default=1 << 20,
    )
    max_connections: Annotated[int, Range(1, 10000)] = doc(
        "Most MLLP connections open at once from all addresses together (besides his_connections reserved for "
        "his_addresses); past it a new connection is closed at accept, before anything is read.", default=32
    )
    max_connections_per_address: Annotated[int, Range(1, 10000)] = doc(
        "Most MLLP connections open at once from one source address (an IPv6 /64 counts as one), out of "
        "max_connections; past it a new connection from that address is closed at accept.", default=16
    )
    his_addresses: list[str] = doc(
        "Source addresses of the HIS systems that send to this listener (their interface engines, pharmacy "
        "system...). Their connections have his_connections of their own that no other address can take, so "
        "nothing else on the intranet can use up the listener and lock the HIS out. Empty: nothing is reserved.",
        default_factory=list,
    )
    his_connections: Annotated[int, Range(1, 10000)] = doc(
        "MLLP connections reserved for his_addresses (once they are all in use, the HIS shares max_connections "
        "with everyone else).", default=8
    )
    idle_timeout: Duration = doc(
        "An MLLP connection that does no work this long (no message answered; bytes outside frames and commit "
        "blocks do not count) is closed.", default=Duration(300.0))
    frame_timeout: Annotated[Duration, Range(1, 3600)] = doc(
        "Longest an MLLP frame may take from its start byte to its end byte; a slower one is answered AE 'not "
        "completed, send it again' (when its MSH-10 arrived whole) and the connection closed. Above the time "
        "the largest message takes on the link.", default=Duration(30.0))
    tls_handshake_timeout: Annotated[Duration, Range(1, 300)] = doc(
        "Longest a TLS handshake on the MLLP listener (inner.tls) may take; then the connection is closed.",
        default=Duration(10.0))
    max_junk_bytes: Annotated[int, Range(16, 64 << 20)] = doc(
        "Most bytes outside MLLP frames (abandoned frames included) a connection may send between two "
        "messages (a CR LF after each frame is fine); past it the connection is closed.", default=65536)
    mllp_release: Annotated[int, Range(1, 2)] = doc(
        "MLLP release of the listener: 1, or 2 (a commit block 0x06/0x15 before each answer, after the commit).",
        default=1,
    )
    bind_device: Optional[str] = doc(
        "Accept MLLP connections only from this network interface (the intranet NIC, e.g. eth1), whatever the "
        "routing: Linux's weak host model otherwise delivers packets for this address that arrive on any NIC.",
        default=None,
    )
    accept_types: list[Annotated[str, Pattern(r"^[A-Z0-9]{3}(\^([A-Z0-9]{3}|\*))?$", "a message type such as SIU^S12 or SIU^*")]] = doc(
        "Message types the HIS may send in (the rest is refused with AR and recorded), e.g. [SIU^S12, SIU^S15]; "
        "prescriptions need RDS^O13 (dispensing) and RDE^O11 (releases) added.",
        default_factory=lambda: ["SIU^*"],
    )
    validation: Literal["tolerant", "strict"] = doc(
        "'strict': also validate each message with hl7apy's v2.5 structure rules and NAK what fails.",
        default="tolerant",
    )
    tls: Optional[MllpListenTls] = doc("TLS with client certificates on the MLLP listener.", default=None)
    endpoints: list[HisConfig] = doc(
        "More HIS endpoints besides `his` (a hospital's pharmacy system is often another machine), each with its "
        "own address, charset, timeouts, queue and TLS; `routes` says which messages go where. Messages they "
        "send in are told apart by MSH-3 (their receiving_application).",
        default_factory=list,
    )

    def __post_validate__(self):
        issues = []
        for i, address in enumerate(self.his_addresses):
            try:
                ipaddress.ip_address(address)
            except ValueError:
                issues.append((f"his_addresses[{i}]", f"{address!r} is not an IP address (a host name is not "
                                                      f"resolved here: write the address the HIS connects from)"))
        names = {self.his.name: "his"}
        apps = {self.his.receiving_application: "his"}
        for i, e in enumerate(self.endpoints):
            if e.name in names:
                issues.append((f"endpoints[{i}].name", f"the name {e.name!r} is taken by {names[e.name]}"))
            names.setdefault(e.name, f"endpoints[{i}]")
            if e.receiving_application in apps:
                issues.append((f"endpoints[{i}].receiving_application",
                               f"{e.receiving_application!r} is also {apps[e.receiving_application]}'s: messages "
                               f"from the two could not be told apart (MSH-3)"))
            apps.setdefault(e.receiving_application, f"endpoints[{i}]")
        return issues

    def z_segment_peers(self) -> frozenset[str]:
        """The HIS endpoints whose Z-segments are passed on to platforms (pass_z_segments)."""
        return frozenset(e.name for e in (self.his, *self.endpoints) if e.pass_z_segments)

    def endpoint(self, name: str) -> HisConfig | None:
        return next((e for e in (self.his, *self.endpoints) if e.name == name), None)


def _charset_issue(key: str, name: str):
    try:
        codecs.lookup(name)
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        return [(key, f"unknown charset {name!r} (use utf-8, gb18030, latin-1 or ascii)")]
    return []
