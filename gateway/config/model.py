"""gatewayd's configuration: one YAML file, parsed into frozen dataclasses (:class:`GatewayConfig`).

Every key is documented where it is declared (``doc``); the README's configuration reference is generated
from these docs (``gatewayd config-reference``).  Loading collects every problem and reports each with
file, line, column and key path (see :mod:`gateway.config.schema`).  The inner gate's section is in
gateway/config/inner.py, the outer gate's and the platforms' in gateway/config/outer.py; here the sections
both gates read, and the checks across sections.
"""

from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

from gateway.config.fields import Duration, Name, Pattern, Range, ReadableFile, doc
from gateway.config.inner import InnerConfig
from gateway.config.outer import OuterConfig, PlatformConfig, normalise_subject
from gateway.config.schema import load
from gateway.domain.routes import type_allowed

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


#: libpq connection parameters that have keys of their own under chamber.postgresql (or must not be in the YAML)
_DSN_OWN_KEYS = {"password": "password_file or password_env", "passfile": "password_file",
                 "sslmode": "sslmode", "sslrootcert": "sslrootcert", "connect_timeout": "connect_timeout"}


@dataclass(frozen=True)
class ChamberPostgresConfig:
    dsn: str = doc(
        "The libpq connection string of the chamber's database, without its password: "
        "'host=10.1.2.7 port=5432 dbname=gatewayd user=gatewayd' or postgresql://gatewayd@10.1.2.7/gatewayd. The "
        "database must sort text bytewise: CREATE DATABASE gatewayd TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C' "
        "ENCODING 'UTF8' (docs/chamber.md). libpq's environment (PGHOST, ...) is not read.")
    password_file: Optional[ReadableFile] = doc(
        "A file holding the database user's password (one line; readable by gatewayd only). Never logged.",
        default=None)
    password_env: Optional[Annotated[str, Pattern(r"^[A-Z_][A-Z0-9_]*$", "an environment variable's name")]] = doc(
        "Or: the environment variable holding it (e.g. from systemd's LoadCredential or an EnvironmentFile). "
        "Without either, the server must not ask for one (peer or certificate authentication).", default=None)
    sslmode: Literal["disable", "require", "verify-ca", "verify-full"] = doc(
        "TLS to the database (libpq's sslmode): verify-full checks the server's certificate and name against "
        "sslrootcert; disable only for a database on this machine.", default="verify-full")
    sslrootcert: Optional[ReadableFile] = doc(
        "The CA that signs the database server's certificate (PEM), for verify-ca and verify-full.", default=None)
    connect_timeout: Annotated[Duration, Range(1, 600)] = doc(
        "Timeout of a new connection to the database.", default=Duration(5.0))

    def __post_validate__(self):
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            return [("dsn", "psycopg is not installed: pip install 'gatewayd[postgresql]'")]
        try:
            params = conninfo_to_dict(self.dsn)
        except Exception as e:  # noqa: BLE001 - psycopg.ProgrammingError: libpq's own words, without the string
            return [("dsn", f"not a libpq connection string: {str(e).splitlines()[0] if str(e) else type(e).__name__}")]
        issues = [("dsn", f"give {key} as {own}, not in the connection string" + (
            " (never a password in the config file)" if key == "password" else ""))
                  for key, own in _DSN_OWN_KEYS.items() if key in params]
        if "dbname" not in params:
            issues.append(("dsn", "name the database (dbname=..., or /dbname in the URI)"))
        if self.password_file is not None and self.password_env is not None:
            issues.append(("password_env", "give password_file or password_env, not both"))
        if self.sslmode in ("verify-ca", "verify-full") and self.sslrootcert is None:
            issues.append(("sslrootcert", f"sslmode {self.sslmode} checks the server's certificate: give the CA "
                                          f"that signs it (or sslmode: require / disable)"))
        return issues

    def password(self) -> str | None:
        """The password, read now from its file or the environment (None: none configured)."""
        import os

        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").strip()
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise LookupError(f"chamber.postgresql.password_env: the environment variable {self.password_env} "
                                  f"is not set")
            return value
        return None


@dataclass(frozen=True)
class ChamberConfig:
    backend: Literal["sqlite", "postgresql"] = doc(
        "Where the chamber lives: sqlite (one file, `path`: one gateway, or one split-lock pair, per chamber) or "
        "postgresql (a database, `postgresql`: docs/chamber.md).", default="sqlite")
    path: Path = doc(
        "With backend: sqlite, the chamber's file (relative paths are relative to this config file). Both gates must be "
        "able to write it; back it up like a database. One chamber serves one gateway, or one outer and one "
        "inner process of the split lock: a second process running the same gate on it is refused at start "
        "(exit 3; claim files <path>.outer.lock and <path>.inner.lock beside it, docs/install.md). With backend: "
        "postgresql only these claim files are written there (the gates are claimed in the database too).",
        default=Path("chamber.sqlite3"),
    )
    postgresql: Optional[ChamberPostgresConfig] = doc(
        "With backend: postgresql, how to reach the database.", default=None)
    keep_messages: Optional[Duration] = doc(
        "How long a message that has ended (delivered, refused, withdrawn) is kept with its raw bytes, answer "
        "and story; then it is deleted. Dead letters stay until `gatewayd queue purge`; a prescription's order "
        "stays with the prescription. A HIS resending a message older than this is no longer recognised as "
        "resending it. Also how long a notification delivered to a platform is kept (pending and dead ones stay). "
        "null: keep every message.",
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

    def __post_validate__(self):
        if self.backend == "postgresql" and self.postgresql is None:
            return [("postgresql", "backend postgresql needs this section (at least its dsn)")]
        if self.backend == "sqlite" and self.postgresql is not None:
            return [("postgresql", "given, but backend is sqlite: set backend: postgresql, or remove it")]
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
    require: list[Literal["birth_date", "gender"]] = doc(
        "Patient details a booking must carry because the HIS needs them to register the patient: birth_date "
        "(Patient.birthDate -> PID-7), gender (Patient.gender -> PID-8). A booking without one is refused (422, "
        "naming it). Default: none (each is sent when the platform gives it).",
        default_factory=list,
    )

    def __post_validate__(self):
        issues, seen = [], {}
        for i, rule in enumerate(self.identifiers):
            if rule.system in seen:
                issues.append((f"identifiers[{i}].system", f"{rule.system} is listed already (identifiers[{seen[rule.system]}])"))
            seen.setdefault(rule.system, i)
        return issues


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
class Operator:
    name: Annotated[str, Pattern(r"^[A-Za-z0-9._-]{1,64}$", "letters, digits, '.', '_' or '-'")] = doc(
        "The operator's login name (in the audit trail as console:<name>).")
    password_hash: Annotated[str, Pattern(r"^scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$",
                                          "a hash printed by `gatewayd console-password`")] = doc(
        "The password's scrypt hash, as `gatewayd console-password` prints it (never the password).")


@dataclass(frozen=True)
class AdminConfig:
    listen: Annotated[str, Pattern(r"^tcp:\d+:interface=(127\.\d+\.\d+\.\d+|::1|\\:\\:1)$",
                                   "a loopback endpoint such as tcp:9102:interface=127.0.0.1")] = doc(
        "Where /healthz, /metrics, /status (what `gatewayd status` asks) and the console listen: loopback only (each "
        "process of a split lock needs its own port; reach the console from a workstation through an SSH tunnel).",
        default="tcp:9102:interface=127.0.0.1",
    )
    operators: list[Operator] = doc(
        "Who may log in to the web console at /console/ on this listener (docs/operations.md); none: no "
        "console. Each login, message shown unmasked and resubmission is audited.",
        default_factory=list,
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
    admin: Optional[AdminConfig] = doc("The admin listener (/healthz, /metrics, /status, the web console at /console/); left out: none (and `gatewayd status` shows no live state).", default=None)
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


def load_config(path: str | Path) -> GatewayConfig:
    """Load and validate the gateway's YAML config; raises ConfigError listing every problem."""
    return load(path, GatewayConfig)
