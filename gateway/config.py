"""gatewayd's configuration: one YAML file, parsed into frozen dataclasses.

Every key is documented here (``metadata['doc']``); the README's configuration reference is generated
from these docs (``gatewayd config-reference``).  Loading collects every problem and reports each with
file, line, column and key path (see :mod:`gateway.confschema`).
"""

from __future__ import annotations

import codecs
import ipaddress
import re
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

from gateway.crossing import type_allowed
from gateway.confschema import Duration, Pattern, Percent, Range, ReadableFile, load

Port = Annotated[int, Range(1, 65535)]
Name = Annotated[str, Pattern(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", "letters, digits, '.', '_' or '-'")]
Scope = Literal["Slot.read", "Schedule.read", "Appointment.read", "Appointment.write", "MedicationRequest.write",
                "MedicationRequest.read", "MedicationDispense.read", "MedicationRequest.claim"]
#: the scopes a platform gets when its config lists none (the prescription scopes of Scope only when listed)
SCOPES: tuple[str, ...] = ("Slot.read", "Schedule.read", "Appointment.read", "Appointment.write")
Serial = Annotated[str, Pattern(r"^(0[xX])?[0-9A-Fa-f]+(:[0-9A-Fa-f]+)*$",
                                "a certificate serial number in hexadecimal, as `openssl x509 -noout -serial` prints it")]


def doc(text: str, **kw):
    return field(metadata={"doc": text}, **kw)


@dataclass(frozen=True)
class HospitalConfig:
    name: str = doc("The hospital's name, shown in the CapabilityStatement.", default="Demo Hospital")
    timezone: str = doc(
        "Time zone of the HIS's local date/times (HL7 DTM has no offset).", default="Asia/Shanghai"
    )

    def __post_validate__(self):
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: e.g. 'Asia', a directory
            return [("timezone", f"unknown time zone {self.timezone!r} (use e.g. Asia/Shanghai)")]
        return []


@dataclass(frozen=True)
class ChamberConfig:
    path: Path = doc(
        "The chamber's SQLite file (relative paths are relative to this config file). Both gates must be "
        "able to write it; back it up like a database.",
        default=Path("chamber.sqlite3"),
    )
    keep_messages: Optional[Duration] = doc(
        "How long a message that has ended (delivered, refused, withdrawn) is kept with its raw bytes, answer "
        "and story; then it is deleted. Dead letters stay until `gatewayd queue purge`; a prescription's order "
        "stays with the prescription. A HIS resending a message older than this is no longer recognised as "
        "resending it. null: keep every message.",
        default=Duration(180 * 86400.0),
    )
    keep_appointments: Optional[Duration] = doc(
        "How long after its slot has ended a settled appointment is kept (with the patient data the booking "
        "needed, the platform's request as sent, its idempotency keys and identifiers), and a slot the HIS "
        "published; then they are deleted. The audit trail is kept apart (audit.retention). null: keep them.",
        default=Duration(180 * 86400.0),
    )
    prune_every: Annotated[Duration, Range(1, None)] = doc(
        "How often what is past keep_messages / keep_appointments (and expired OAuth2 tokens and client "
        "assertions) is deleted, in small transactions; also once at start.",
        default=Duration(3600.0),
    )


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
    host: str = doc("The HIS interface engine's address on the intranet.")
    port: Port = doc("The HIS's MLLP port, where the gateway sends booking requests (SRM) and queries (SQM), or "
                     "pharmacy orders (RDE/OMP) for a pharmacy endpoint.")
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


@dataclass(frozen=True)
class TlsConfig:
    certificate: ReadableFile = doc("The gateway's server certificate (PEM), with its chain.")
    private_key: ReadableFile = doc("The server certificate's private key (PEM).")
    client_ca: ReadableFile = doc(
        "CA certificate(s) (PEM) that sign platforms' client certificates; clients without one are refused "
        "(unless client_certificates: optional)."
    )
    client_certificates: Literal["required", "optional"] = doc(
        "'required': every client presents a certificate signed by client_ca, else the handshake fails (mutual "
        "TLS). 'optional': a certificate is asked for and checked when one is presented; a client without one "
        "(a platform behind a TLS-terminating proxy) must send a bearer token (platforms[].token) with every "
        "request, else 401. Certificate platforms work the same either way.",
        default="required",
    )
    crl: Optional[ReadableFile] = doc(
        "Certificate revocation list(s) of client_ca (PEM, one or more CRLs, or DER): a client certificate it "
        "lists is refused (403). Each CRL must be signed by a CA in client_ca. Re-read on SIGHUP; a CRL past "
        "its nextUpdate is still applied and logged as an error (outer.crl_expired).",
        default=None,
    )

    def __post_validate__(self):
        if self.crl is None:
            return []
        from adapters.mllp.tls import TlsConfigError, load_crl

        try:
            load_crl(self.crl, self.client_ca)
        except TlsConfigError as e:
            return [("crl", str(e))]
        return []


@dataclass(frozen=True)
class RateLimitConfig:
    per_second: Annotated[float, Range(0.001, 1_000_000)] = doc(
        "Requests per second allowed on average (the token bucket's refill rate)."
    )
    burst: Annotated[int, Range(1, 1_000_000)] = doc(
        "Most requests allowed at once after a quiet time (the token bucket's size)."
    )


@dataclass(frozen=True)
class OuterConfig:
    tls: TlsConfig = doc("TLS with mutual authentication: a platform presents a client certificate (or, with "
                         "client_certificates: optional, a bearer token).")
    host: str = doc("Address the FHIR API listens on (the internet-facing side).", default="127.0.0.1")
    port: Port = doc("Port of the FHIR API.", default=8443)
    base_path: Annotated[str, Pattern(r"^/[A-Za-z0-9/_-]*[A-Za-z0-9_-]$", "a path such as /fhir")] = doc(
        "Path of the FHIR base.", default="/fhir"
    )
    public_base_url: Optional[str] = doc(
        "The base URL platforms use (for Location headers and fullUrl), if a proxy changes it.", default=None
    )
    max_request_bytes: Annotated[int, Range(1024, 64 << 20)] = doc(
        "Largest request body accepted: a larger Content-Length is answered 413 before a byte of the body is read, "
        "a chunked body is cut off with 413 when it passes this size.", default=1 << 20
    )
    max_connections: Annotated[int, Range(1, 1_000_000)] = doc(
        "Most HTTPS connections open at once, from all addresses together; past it a new connection is closed at "
        "accept, before any TLS work. With the inner gate's connections it must fit the process's descriptor "
        "limit (the unit's LimitNOFILE), or the gateway refuses to start.",
        default=2048,
    )
    max_connections_per_address: Annotated[int, Range(1, 1_000_000)] = doc(
        "Most HTTPS connections open at once from one source address (an IPv6 /64 counts as one address); past "
        "it a new connection from that address is closed at accept. A platform behind NAT holds its pool of "
        "keep-alive connections from one address: leave room for it.",
        default=64,
    )
    tls_handshake_timeout: Annotated[Duration, Range(1, 300)] = doc(
        "Longest time from accepting a connection to the end of its TLS handshake; then the connection is cut.",
        default=Duration(10.0),
    )
    header_timeout: Annotated[Duration, Range(1, 300)] = doc(
        "Longest time from a request's first byte to the end of its headers, however the bytes trickle in; then "
        "408 and the connection is closed.",
        default=Duration(10.0),
    )
    body_timeout: Annotated[Duration, Range(1, 3600)] = doc(
        "Longest time to receive a request's whole body once its headers are in; then 408 and the connection is "
        "closed.",
        default=Duration(30.0),
    )
    idle_timeout: Annotated[Duration, Range(1, 3600)] = doc(
        "How long a connection may wait for its next request (or its first, after the TLS handshake); then it "
        "is closed.",
        default=Duration(60.0),
    )
    answer_within: Duration = doc(
        "How long a booking, a cancellation, an IHE $hold (with hold_at_his) or $book, or a prescription waits "
        "for the HIS's answer before answering 202 (it then completes in the background).",
        default=Duration(5.0),
    )
    hold_expires: Duration = doc(
        "How long a slot stays held (busy-tentative) waiting for the HIS, or after Appointment/$hold waiting "
        "for $book; then the hold is released (and the booking cancelled).",
        default=Duration(300.0),
    )
    hold_at_his: bool = doc(
        "Tell the HIS of an IHE $hold: $hold queues an SRM^S01 whose ARQ-8 is the hold_appointment_type "
        "(Tentative) of the HIS endpoint the booking is routed to, then waits up to answer_within for the HIS "
        "(200 held, 409 refused, 202 not answered yet); the hold is released at the HIS with the cancel message "
        "when it expires or is dropped. "
        "false: holds live in the gateway only and the HIS hears of nothing until $book.",
        default=False,
    )
    page_size: Annotated[int, Range(1, 1000)] = doc("Default and largest _count of a search.", default=100)
    bind_device: Optional[str] = doc(
        "Accept HTTPS connections only from this network interface (the internet/DMZ NIC), whatever the routing.",
        default=None,
    )
    his_name: Name = doc(
        "The HIS that outbound messages no route takes are addressed to (its inner.his.name; in split mode the "
        "outer gate knows only this name and the routes' endpoint names, never an address).",
        default="his",
    )
    max_backlog: Annotated[int, Range(1, 10_000_000)] = doc(
        "Most messages waiting for one HIS endpoint (each counted on its own); past it new bookings, or new "
        "prescriptions when the pharmacy endpoint is the one behind, get 503 with Retry-After.", default=1000
    )
    rate_limit: Optional[RateLimitConfig] = doc(
        "Requests per second for all platforms together (token bucket); past it 429 with Retry-After. "
        "Default 1000 per second, burst 2000; empty (~) for no global limit.",
        default_factory=lambda: RateLimitConfig(per_second=1000.0, burst=2000),
    )
    token_rate_limit: Optional[RateLimitConfig] = doc(
        "Requests per second to the OAuth2 token endpoint from one source address (token bucket), checked "
        "before the global limit: past it 429 with Retry-After, so one client flooding the endpoint cannot use up "
        "the global limit for everyone. Default 10 per second, burst 20; empty (~) for no such limit.",
        default_factory=lambda: RateLimitConfig(per_second=10.0, burst=20),
    )
    token_url: Optional[Annotated[str, Pattern(r"^https://[^\s/?#]+(/[^\s?#]*)?$", "an https:// URL")]] = doc(
        "The token endpoint's URL as platforms address it: client assertions must name it in 'aud'. The gateway "
        "serves it at /oauth/token. Default: the origin of public_base_url, else https://host:port, followed by "
        "/oauth/token.",
        default=None,
    )
    max_json_depth: Annotated[int, Range(2, 1000)] = doc(
        "Deepest nesting of objects and arrays accepted in a JSON body (400 beyond).", default=32
    )
    max_string_chars: Annotated[int, Range(256, 64 << 20)] = doc(
        "Longest string (value or key) accepted in a JSON body, in characters (400 beyond).", default=65536
    )


@dataclass(frozen=True)
class QuotaConfig:
    schedule: Annotated[str, Pattern(r"^(\*|[^\s*]{1,200})$", "a schedule id such as D001, or '*'")] = doc(
        "The schedule this quota applies to (its id, as in Schedule/<id>), or '*' for every schedule that "
        "has no entry of its own."
    )
    share: Optional[Percent] = doc(
        "The platform's share of the schedule's slots on each day, e.g. 5%: it may hold floor(share x slots "
        "of that schedule that day) of them. Give share or per_day, not both.",
        default=None,
    )
    per_day: Optional[Annotated[int, Range(0, 100_000)]] = doc(
        "How many of the schedule's slots the platform may hold per day (instead of share).", default=None
    )
    release_before: Optional[Duration] = doc(
        "Slots starting within this time from now are open to every platform, quota or not (unbooked quota "
        "returns to everyone). Empty (~): never released.",
        default=Duration(86400.0),
    )

    def __post_validate__(self):
        if (self.share is None) == (self.per_day is None):
            return [("", "give either share (e.g. 5%) or per_day (e.g. 10), not both or neither")]
        return []


IdentifierType = Annotated[str, Pattern(r"^[A-Za-z0-9]{1,10}$", "an HL7 identifier type code (table 0203) such as "
                                                                   "NNCHN, MR, PI or PT")]


@dataclass(frozen=True)
class PatientIdentifierConfig:
    system: Annotated[str, Pattern(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$", "a URI such as urn:oid:2.16.156.10011.1.5")] = doc(
        "The FHIR Identifier.system platforms send for this kind of identifier, e.g. urn:oid:2.16.156.10011.1.5 "
        "(resident identity card, 居民身份证), the hospital's medical-record number system, or a phone system."
    )
    type: IdentifierType = doc(
        "The identifier type code the HIS expects in PID-3.5 (CX.5, HL7 table 0203), whatever type the platform "
        "sent: e.g. NNCHN (national person identifier, China), MR (medical record number), PI (patient internal "
        "identifier), PT (patient external identifier), or the HIS's own code for a phone number."
    )
    assigning_authority: Optional[Annotated[str, Pattern(r"^[^\s^~|\\]{1,227}$", "HD text: no spaces, carets, tildes, "
                                                                                   "bars or backslashes ('&' separates its parts)")]] = doc(
        "PID-3.4 (CX.4, an HD): who issued the identifier as the HIS names it, e.g. HIS for its own record numbers "
        "or '&2.16.156.10011.1.5&ISO' (HD.2 the OID, HD.3 ISO); '&' separates the HD's parts. Default: the system.",
        default=None,
    )
    name: Optional[str] = doc("What the identifier is, for people (e.g. 居民身份证 resident ID card); shown in "
                              "refusals beside the system.", default=None)
    value_pattern: Optional[str] = doc(
        "A regular expression the whole value must match, e.g. '[0-9]{17}[0-9X]' for the 18-character resident "
        "ID; a value that does not is refused (422, the value never echoed). Default: any value.",
        default=None,
    )

    def __post_validate__(self):
        if self.value_pattern is not None:
            try:
                re.compile(self.value_pattern)
            except (re.error, OverflowError) as e:  # OverflowError: a repetition count too large
                return [("value_pattern", f"not a regular expression: {e}")]
            except RecursionError:
                return [("value_pattern", "not a regular expression: groups nested too deeply")]
        return []


@dataclass(frozen=True)
class PatientsConfig:
    identifiers: list[PatientIdentifierConfig] = doc(
        "The patient identifier systems platforms may identify a patient by, and how each becomes a PID-3 "
        "repetition of the SRM sent to the HIS. A Patient with an identifier of another system is refused (422, "
        "naming the accepted systems). Empty (the default): every system is accepted and written as it came "
        "(CX.4 = the system, CX.5 = the identifier's type code, else PT).",
        default_factory=list,
    )

    def __post_validate__(self):
        issues, seen = [], {}
        for i, rule in enumerate(self.identifiers):
            if rule.system in seen:
                issues.append((f"identifiers[{i}].system", f"{rule.system} is listed already (identifiers[{seen[rule.system]}])"))
            seen.setdefault(rule.system, i)
        return issues


SpkiPin = Annotated[str, Pattern(r"^([0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){31}|[A-Za-z0-9+/]{43}=?)$",
                                 "the SHA-256 of a SubjectPublicKeyInfo, in base64 (44 characters) or hex (64)")]
JwsAlgorithm = Literal["RS384", "ES384", "RS256", "ES256"]


@dataclass(frozen=True)
class TokenConfig:
    public_keys: ReadableFile = doc(
        "The platform's public key(s) that verify its client assertions: a PEM file (PUBLIC KEY or CERTIFICATE "
        "blocks) or a JWKS file (JSON {\"keys\": [...]}, matched by the assertion's kid). Never a private key."
    )
    algorithms: list[JwsAlgorithm] = doc(
        "Signature algorithms the platform's assertions may use (SMART Backend Services: RS384, ES384).",
        default_factory=lambda: ["RS384", "ES384"],
    )
    lifetime: Annotated[Duration, Range(1, 300)] = doc(
        "How long an access token lasts (expires_in), at most 5 minutes.", default=Duration(300.0)
    )

    def __post_validate__(self):
        from gateway.oauth import KeyFileError, load_public_keys

        issues = []
        if not self.algorithms:
            issues.append(("algorithms", "give at least one algorithm"))
        elif len(set(self.algorithms)) != len(self.algorithms):
            issues.append(("algorithms", "an algorithm is listed twice"))
        try:
            keys = load_public_keys(self.public_keys)
        except KeyFileError as e:
            issues.append(("public_keys", str(e)))
        else:
            if self.algorithms and not any(k.fits(alg) for k in keys for alg in self.algorithms):
                issues.append(("public_keys", f"no key in it fits {', '.join(self.algorithms)} (RS* need RSA keys "
                                              f"of 2048 bits or more, ES256 a P-256 key, ES384 a P-384 key)"))
        return issues


@dataclass(frozen=True)
class PlatformConfig:
    name: Name = doc("The platform's name (appears in the chamber and the logs).")
    certificate_subject: str = doc(
        "Subject of the platform's client certificate, RFC 4514 form, e.g. 'CN=platform-demo,O=gatewayd dev'. "
        "A subject with only a CN (e.g. 'CN=platform-demo') matches any certificate with that CN."
    )
    display: Optional[str] = doc("A human-readable name.", default=None)
    scopes: list[Scope] = doc(
        "What the platform may do: Slot.read, Schedule.read, Appointment.read (its own appointments), "
        "Appointment.write (book and cancel) — the default; and, only when listed, MedicationRequest.write "
        "(prescribe), MedicationRequest.read and MedicationDispense.read (its own prescriptions), "
        "MedicationRequest.claim (an outside pharmacy: list and claim released prescriptions). A request outside "
        "them gets 403.",
        default_factory=lambda: list(SCOPES),
    )
    quotas: list[QuotaConfig] = doc(
        "The platform's share of each schedule's slots (docs/security.md). A schedule with no quota here "
        "(and no '*' entry) is not limited.",
        default_factory=list,
    )
    rate_limit: Optional[RateLimitConfig] = doc(
        "Requests per second for this platform (token bucket); past it 429 with Retry-After. Default 100 "
        "per second, burst 200; empty (~) for no limit.",
        default_factory=lambda: RateLimitConfig(per_second=100.0, burst=200),
    )
    revoked_serials: list[Serial] = doc(
        "Serial numbers (hex) of this platform's client certificates that are no longer accepted (403), "
        "checked on every request; takes effect on SIGHUP.",
        default_factory=list,
    )
    certificate_spki_sha256: list[SpkiPin] = doc(
        "Pins: SHA-256 of the SubjectPublicKeyInfo (base64 or hex) of the platform's certificate key(s). When "
        "given, a certificate with the platform's subject but another key is refused (403); list two during a "
        "key change. Takes effect on SIGHUP.",
        default_factory=list,
    )
    token: Optional[TokenConfig] = doc(
        "Bearer tokens for this platform (OAuth2 client credentials with a signed JWT client assertion, SMART "
        "Backend Services), e.g. behind a TLS-terminating proxy. Its client_id is its name.",
        default=None,
    )

    def __post_validate__(self):
        issues = []
        seen: dict[str, int] = {}
        for i, q in enumerate(self.quotas):
            if q.schedule in seen:
                issues.append((f"quotas[{i}].schedule", f"schedule {q.schedule!r} has a quota already "
                                                        f"(quotas[{seen[q.schedule]}])"))
            seen[q.schedule] = i
        if len(set(self.scopes)) != len(self.scopes):
            issues.append(("scopes", "a scope is listed twice"))
        return issues

    def revoked_serial_numbers(self) -> frozenset[int]:
        return frozenset(serial_number(s) for s in self.revoked_serials)

    def spki_pins(self) -> frozenset[bytes]:
        """The pinned SubjectPublicKeyInfo SHA-256 digests (32 bytes each)."""
        import base64

        return frozenset(bytes.fromhex(p.replace(":", "")) if len(p) >= 64
                         else base64.b64decode(p + "=" * (-len(p) % 4)) for p in self.certificate_spki_sha256)


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = doc("Least severe level logged.", default="info")
    format: Literal["auto", "json", "console"] = doc(
        "'json' (one object per line), 'console' (for a person), 'auto' (console on a terminal, else json).",
        default="auto",
    )


@dataclass(frozen=True)
class AuditConfig:
    retention: Annotated[Duration, Range(86400, None)] = doc(
        "How long audit records are kept; older ones are removed only by `gatewayd audit prune` (which "
        "keeps the chain verifiable). MLPS level 3 reviewers expect at least 180 days.",
        default=Duration(180 * 86400.0),
    )
    strict: bool = doc(
        "What to do with a read of patient data whose audit record cannot be committed (a full or failing "
        "disk): false = answer it and write the record to the log as 'audit.not_recorded' (reads keep "
        "working); true = refuse it with 503, nothing disclosed.",
        default=False,
    )


@dataclass(frozen=True)
class AdminConfig:
    listen: Annotated[str, Pattern(r"^tcp:\d+:interface=(127\.\d+\.\d+\.\d+|::1|\\:\\:1)$",
                                   "a loopback endpoint such as tcp:9102:interface=127.0.0.1")] = doc(
        "Where /healthz and /metrics listen: loopback only (each process of a split lock needs its own port).",
        default="tcp:9102:interface=127.0.0.1",
    )


@dataclass(frozen=True)
class DaemonConfig:
    shutdown_grace: Duration = doc(
        "On SIGTERM: stop accepting, then wait at most this long for messages in flight to be answered "
        "(what is still unanswered is resent, with its control id, after the restart).",
        default=Duration(10.0),
    )


@dataclass(frozen=True)
class RouteConfig:
    to: Name = doc("The HIS endpoint they go to: inner.his.name or the name of one of inner.endpoints.")
    types: list[Annotated[str, Pattern(r"^[A-Z0-9]{3}(\^([A-Z0-9]{3}|\*))?$", "a message type such as RDE^O11 or RDE^*")]] = doc(
        "Message types this route carries, e.g. [RDE^O11, OMP^O09] (or RDE^*, or SRM for every event). Left out "
        "(with a facility): every type.", default_factory=list)
    facility: Optional[str] = doc(
        "Only messages for this facility: a booking's (SRM) facility is the one that published the slot's "
        "schedule, MSH-4.1 of the HIS's SIU (or SQR^S25), e.g. '分院A' or 'BRANCH-A', compared exactly. Messages "
        "routed here carry it in MSH-6. Messages for no facility (prescriptions) never match such a route.",
        default=None)

    def __post_validate__(self):
        if not self.types and self.facility is None:
            return [("types", "name the message types this route carries, or a facility, or both")]
        if self.facility is not None and not self.facility.strip():
            return [("facility", "an empty facility matches nothing: leave the key out, or name the facility")]
        return []

    def matches(self, message_type: str, facility: str | None) -> bool:
        """Does a message of this type, for this facility (None: none), take this route?"""
        if self.facility is not None and self.facility != facility:
            return False
        return not self.types or type_allowed(message_type, self.types)


@dataclass(frozen=True)
class DrugCodeConfig:
    system: str = doc("The code system URI a platform uses, e.g. http://www.whocc.no/atc.")
    code: str = doc("The code in that system.")
    his_code: str = doc("The hospital's own code for the drug (in the first of pharmacy.drug_systems).")


@dataclass(frozen=True)
class PharmacyConfig:
    message: Literal["RDE", "OMP"] = doc(
        "The pharmacy order the HIS takes: RDE^O11 (answered by RRE^O12) or OMP^O09 (ORP^O10).", default="RDE")
    drug_systems: dict[str, str] = doc(
        "FHIR code system URI -> HL7 coding system name the HIS knows, in order of preference: the hospital's "
        "local drug code system first.",
        default_factory=lambda: {"urn:gatewayd:his:drug": "99HIS"},
    )
    drug_codes: list[DrugCodeConfig] = doc(
        "Per-hospital overrides: a platform's drug code -> the hospital's, used when a prescription carries no "
        "coding in a system of drug_systems.", default_factory=list)

    def __post_validate__(self):
        return [] if self.drug_systems else [("drug_systems", "name at least the hospital's drug code system")]


@dataclass(frozen=True)
class PrescriptionsConfig:
    prescriber_cas: list[ReadableFile] = doc(
        "CA certificates (PEM) trusted to issue prescribers' signing certificates (docs/prescriptions.md).")
    require_signature: bool = doc(
        "Refuse prescriptions without a valid prescriber signature (403). false only for a demo.", default=True)
    signer_must_match_requester: bool = doc(
        "The signing certificate must name the prescriber the prescription names (requester's identifier).",
        default=True)
    prescriber_id_attribute: Literal["serialNumber", "CN", "UID"] = doc(
        "The certificate subject attribute that holds the prescriber's identifier (licence number).",
        default="serialNumber")
    release_key: Optional[ReadableFile] = doc(
        "The gateway's signing key (PEM) for prescriptions the HIS releases to outside pharmacies.", default=None)
    release_chain: Optional[ReadableFile] = doc(
        "The release key's certificate (PEM, with intermediates), sent in each signature's x5c.", default=None)

    def __post_validate__(self):
        if (self.release_key is None) != (self.release_chain is None):
            return [("release_key", "give release_key and release_chain together")]
        return []


@dataclass(frozen=True)
class GatewayConfig:
    inner: Optional[InnerConfig] = doc(
        "The inner gate: HL7 v2 over MLLP, towards the HIS (intranet). Leave it out of the outer gate's "
        "config in split mode (`gatewayd run --gate outer`).", default=None)
    outer: Optional[OuterConfig] = doc(
        "The outer gate: FHIR R4 over HTTPS, towards platforms (internet). Leave it out of the inner gate's "
        "config in split mode (`gatewayd run --gate inner`).", default=None)
    platforms: list[PlatformConfig] = doc("The platforms allowed to call the FHIR API (with outer).",
                                          default_factory=list)
    hospital: HospitalConfig = doc("About the hospital.", default_factory=HospitalConfig)
    chamber: ChamberConfig = doc("The durable store between the gates.", default_factory=ChamberConfig)
    logging: LoggingConfig = doc("Logging.", default_factory=LoggingConfig)
    audit: AuditConfig = doc("The audit trail in the chamber (docs/security.md).", default_factory=AuditConfig)
    daemon: DaemonConfig = doc("The process itself.", default_factory=DaemonConfig)
    admin: Optional[AdminConfig] = doc("The admin listener (/healthz, /metrics); left out: none.", default=None)
    routes: list[RouteConfig] = doc(
        "Which HIS endpoint outbound messages go to, by message type and/or by the facility that published a "
        "booking's schedule, first match wins; what no route takes goes to the HIS (inner.his / outer.his_name). "
        "A cancellation goes where its booking went. Both gates of a split lock need the same routes (names "
        "only). Changed routes apply on SIGHUP to new bookings and prescriptions while inner.endpoints stay the "
        "same; with changed endpoints they wait for a restart.",
        default_factory=list)
    patients: PatientsConfig = doc("How platforms identify patients, and how the HIS gets those identifiers "
                                   "(docs/ihe-scheduling.md, Patient identifiers).", default_factory=PatientsConfig)
    pharmacy: PharmacyConfig = doc("How prescriptions are written for the HIS pharmacy (docs/pharmacy-profile.md).",
                                   default_factory=PharmacyConfig)
    prescriptions: Optional[PrescriptionsConfig] = doc(
        "E-prescriptions on the outer gate (POST /MedicationRequest, releases to pharmacies); left out: the "
        "FHIR API takes no prescriptions.", default=None)

    def route(self, message_type: str, facility: str | None = None) -> str:
        """The HIS endpoint a message of this type (for this facility) goes to: the first route that
        matches, else the HIS."""
        r = self.route_taken(message_type, facility)
        if r is not None:
            return r.to
        return self.inner.his.name if self.inner is not None else self.outer.his_name

    def route_taken(self, message_type: str, facility: str | None = None) -> RouteConfig | None:
        """The first route a message of this type (for this facility) matches; None: it goes to the HIS."""
        return next((r for r in self.routes if r.matches(message_type, facility)), None)

    def __post_validate__(self):
        issues = []
        seen_names: dict[str, int] = {}
        seen_subjects: dict[str, int] = {}
        for i, p in enumerate(self.platforms):
            if p.name in seen_names:
                issues.append((f"platforms[{i}].name", f"platform name {p.name!r} is used twice"))
            seen_names[p.name] = i
            subject = normalise_subject(p.certificate_subject)
            if subject is None:
                issues.append((f"platforms[{i}].certificate_subject",
                               "not an RFC 4514 subject such as 'CN=platform-demo'"))
            elif subject in seen_subjects:
                issues.append((f"platforms[{i}].certificate_subject",
                               f"the same subject is given to platform {self.platforms[seen_subjects[subject]].name!r}"))
            else:
                seen_subjects[subject] = i
        if self.inner is None and self.outer is None:
            issues.append(("", "an 'inner' or an 'outer' section (or both) is needed"))
        if self.outer is not None and not self.platforms:
            issues.append(("platforms", "at least one platform is needed"))
        if self.outer is None and self.platforms:
            issues.append(("platforms", "platforms belong with an 'outer' section (the FHIR API)"))
        if self.inner is not None and self.outer is not None and self.outer.his_name != self.inner.his.name:
            issues.append(("outer.his_name", f"bookings would go to {self.outer.his_name!r} but the HIS is "
                                             f"named {self.inner.his.name!r} (inner.his.name)"))
        for i, r in enumerate(self.routes):
            target = self.inner.endpoint(r.to) if self.inner is not None else None
            if self.inner is not None and target is None:
                issues.append((f"routes[{i}].to", f"no HIS endpoint is named {r.to!r} (inner.his.name or "
                                                  f"inner.endpoints[].name)"))
            elif target is not None:
                if not r.types and not type_allowed("SRM^S01", target.send_types):
                    issues.append((f"routes[{i}].to", f"bookings for facility {r.facility!r} go to {r.to!r}, whose "
                                                      f"send_types do not allow SRM: they would be dead-lettered"))
                for t in r.types:
                    if not type_allowed(t.replace("*", "X01") if t.endswith("*") else t, target.send_types):
                        issues.append((f"routes[{i}].types", f"{t} goes to {r.to!r}, whose send_types do not allow "
                                                             f"it: it would be dead-lettered, never sent"))
        if self.prescriptions is not None and self.outer is None:
            issues.append(("prescriptions", "prescriptions belong with an 'outer' section (the FHIR API)"))
        return issues


def _charset_issue(key: str, name: str):
    try:
        codecs.lookup(name)
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        return [(key, f"unknown charset {name!r} (use utf-8, gb18030, latin-1 or ascii)")]
    return []


def serial_number(text: str) -> int:
    """'0x1A2B', '1a:2b' or '1A2B' (hex, as openssl prints it) -> the integer serial."""
    text = text.strip()
    if text[:2].lower() == "0x":
        text = text[2:]
    return int(text.replace(":", ""), 16)


def normalise_subject(subject: str) -> tuple[tuple[str, str], ...] | None:
    """'CN=a, O=b' -> (('CN','a'), ('O','b')) sorted; None when it is not of that form."""
    parts = []
    for piece in _split_rdns(subject):
        if "=" not in piece:
            return None
        k, v = piece.split("=", 1)
        k, v = k.strip().upper(), v.strip()
        if not k or not v:
            return None
        parts.append((k, v))
    if not parts:
        return None
    return tuple(sorted(parts))


def _split_rdns(subject: str) -> list[str]:
    out, cur, escaped = [], [], False
    for ch in subject:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in ",+":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur or out:
        out.append("".join(cur))
    return [p for p in (s.strip() for s in out) if p]


def load_config(path: str | Path) -> GatewayConfig:
    """Load and validate the gateway's YAML config; raises ConfigError listing every problem."""
    return load(path, GatewayConfig)
