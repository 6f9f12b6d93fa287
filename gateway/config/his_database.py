"""The keys of a HIS endpoint of ``kind: database`` (``inner.his.database``): the HIS's own database, reached
with SQLAlchemy Core — the view the HIS writes its slots into and the intermediate table the gateway writes
bookings and cancellations into (中间表/视图), their column names, the HIS's codes and the dialect's quirks.

How the gateway uses them: adapters/inner/database.py and docs/his-adapters.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from gateway.config.fields import Duration, Pattern, Range, ReadableFile, doc

#: a table, view or column name as the HIS's database spells it (Chinese names included; no quotes, no ';')
SqlName = Annotated[str, Pattern(r"^[^\s\"'`;\\\x00]{1,128}$", "a table or column name (letters, digits, "
                                                              "'_', '.' for schema.table; no spaces or quotes)")]
#: a code as the HIS writes it in a column
HisCode = Annotated[str, Pattern(r"^[^\x00\r\n]{1,64}$", "a code of one line, at most 64 characters")]


@dataclass(frozen=True)
class SlotColumns:
    schedule_id: SqlName = doc("The column with the schedule's id (排班号: one doctor's clinic session); with "
                               "start it names the slot.")
    start: SqlName = doc("The slot's start (a date and time; a naive one is the hospital's local time).")
    status: SqlName = doc("The slot's status code at the HIS (its values in slot_status_codes).")
    minutes: Optional[SqlName] = doc("The slot's length in minutes (or give end).", default=None)
    end: Optional[SqlName] = doc("The slot's end (instead of minutes).", default=None)
    schedule_name: Optional[SqlName] = doc("The schedule's display name.", default=None)
    department_code: Optional[SqlName] = doc("The department's code (科室代码).", default=None)
    department_name: Optional[SqlName] = doc("The department's name (科室名称).", default=None)
    doctor_code: Optional[SqlName] = doc("The doctor's code (医生代码).", default=None)
    doctor_name: Optional[SqlName] = doc("The doctor's name (医生姓名).", default=None)
    service_code: Optional[SqlName] = doc("The service's code (号别: clinic level).", default=None)
    service_name: Optional[SqlName] = doc("The service's name.", default=None)
    his_appointment: Optional[SqlName] = doc("The HIS's appointment number on a booked slot.", default=None)

    def __post_validate__(self):
        if (self.minutes is None) == (self.end is None):
            return [("minutes", "give the slot's length as either minutes or end (one of the two)")]
        return []


@dataclass(frozen=True)
class SlotStatusCodes:
    free: list[HisCode] = doc("Codes of a slot patients may book (可预约).")
    booked: list[HisCode] = doc("Codes of a slot that is booked (已预约).", default_factory=list)
    blocked: list[HisCode] = doc("Codes of a slot that is closed (停诊, 锁定).", default_factory=list)


@dataclass(frozen=True)
class SlotView:
    view: SqlName = doc("The view (or table) the HIS writes its slots into, e.g. V_GH_PB or schema.view.")
    columns: SlotColumns = doc("Which column holds what.")
    status_codes: SlotStatusCodes = doc("The HIS's slot status codes; a row with another code is refused "
                                        "(recorded with the reason, not applied).")
    change_column: Optional[SqlName] = doc(
        "A column that grows with each change of a row (a timestamp or an increasing number, 更新时间 / 版本号): "
        "each poll reads only the rows changed since the last one. Without it, each poll reads the whole window "
        "(window_days from today) and applies what differs from the previous poll; a slot that leaves the "
        "window's rows is taken as closed.", default=None)
    interval: Annotated[Duration, Range(0.1, 86400)] = doc("How often the view is read.", default=Duration(10.0))
    window_days: Annotated[int, Range(1, 90)] = doc("How many days ahead (from today) are read.", default=7)
    max_rows: Annotated[int, Range(1, 1_000_000)] = doc(
        "Most rows one poll reads (with change_column, the rest waits for the next poll; without, a window "
        "with more rows is refused with an alert rather than read in part).", default=20000)


@dataclass(frozen=True)
class BookingColumns:
    key: SqlName = doc("The gateway's idempotency key (the message's control id, e.g. G0123...): the same on "
                       "every resend, so a resend finds the row it wrote and never writes a second one. It should "
                       "have a unique index.")
    action: SqlName = doc("What is asked (its values in action_codes).")
    status: SqlName = doc("The HIS's answer, written by the HIS's job (its values in answer_codes); the gateway "
                          "writes the pending code.")
    schedule_id: SqlName = doc("The schedule's id, as the slot view names it.")
    start: SqlName = doc("The slot's start (the hospital's local time).")
    placer: Optional[SqlName] = doc("The gateway's appointment id.", default=None)
    his_appointment: Optional[SqlName] = doc(
        "The HIS's appointment number: written by the HIS on a booking it accepts (read back), written by the "
        "gateway on a cancellation.", default=None)
    patient_id: Optional[SqlName] = doc("The patient's first identifier (as patients.identifiers writes it).",
                                        default=None)
    patient_id_type: Optional[SqlName] = doc("Its type code (e.g. NNCHN).", default=None)
    patient_name: Optional[SqlName] = doc("The patient's name (family name then given name).", default=None)
    phone: Optional[SqlName] = doc("The patient's phone number.", default=None)
    service_code: Optional[SqlName] = doc("The service's code.", default=None)
    reason: Optional[SqlName] = doc("Why a booking is cancelled.", default=None)
    message: Optional[SqlName] = doc("The HIS's text with its answer (e.g. why it refused).", default=None)
    created: Optional[SqlName] = doc("When the gateway wrote the row (the hospital's local time).", default=None)


@dataclass(frozen=True)
class ActionCodes:
    book: HisCode = doc("The action code of a booking (预约).", default="1")
    cancel: HisCode = doc("The action code of a cancellation (取消).", default="2")
    hold: Optional[HisCode] = doc("The action code of a hold (锁号, with outer.hold_at_his); none: a hold is "
                                  "refused.", default=None)


@dataclass(frozen=True)
class AnswerCodes:
    pending: HisCode = doc("The status the gateway writes: the HIS has not answered yet.", default="0")
    accepted: list[HisCode] = doc("Statuses of an accepted request.", default_factory=lambda: ["1"])
    refused: list[HisCode] = doc("Statuses of a refused request (never sent again).", default_factory=lambda: ["2"])
    failed: list[HisCode] = doc("Statuses of a request the HIS failed to process (dead-lettered with its message).",
                                default_factory=list)


@dataclass(frozen=True)
class BookingTable:
    table: SqlName = doc("The intermediate table the gateway writes bookings and cancellations into.")
    columns: BookingColumns = doc("Which column holds what.")
    action_codes: ActionCodes = doc("The HIS's codes for what is asked.", default_factory=ActionCodes)
    answer_codes: AnswerCodes = doc("The HIS's codes for its answer.", default_factory=AnswerCodes)
    answer_poll: Annotated[Duration, Range(0.05, 60)] = doc(
        "How often the row's status is read while the gateway waits for the HIS's answer (within the "
        "endpoint's ack_timeout; then the message is resent, which finds its row again).", default=Duration(0.5))


#: what a stored procedure's statement may bind (adapters.maps.his_requests.HisRequest's fields)
PROCEDURE_PARAMETERS = frozenset({"key", "placer", "schedule_id", "start", "minutes", "his_appointment", "patient_id",
                                  "patient_id_type", "patient_name", "phone", "service_code", "reason"})


def statement_issues(key: str, statement: str) -> list[tuple[str, str]]:
    """Problems with a statement's :parameters (``::`` casts are not parameters)."""
    unknown = sorted(set(re.findall(r"(?<![:\w]):([A-Za-z_]\w*)", statement)) - PROCEDURE_PARAMETERS)
    if unknown:
        return [(key, f"unknown parameter :{unknown[0]}; the parameters are: "
                      f"{', '.join(':' + p for p in sorted(PROCEDURE_PARAMETERS))}")]
    return []


@dataclass(frozen=True)
class BookingProcedures:
    book: str = doc(
        "The statement that books through the HIS's stored procedure, with the gateway's values as :parameters "
        "(:key — the idempotency key, the same on every resend: the procedure must answer a key it has seen "
        "with its first answer — :schedule_id, :start, :placer, :patient_id, :patient_id_type, :patient_name, "
        ":phone, :service_code, :minutes), e.g. for PostgreSQL, whose INOUT parameters come back as a row: "
        "'CALL 预约挂号(:key, :schedule_id, :start, :patient_name, NULL, NULL, NULL)'; for MySQL/MariaDB: "
        "'CALL 预约挂号(:key, :schedule_id, :start, :patient_name, @状态, @预约号, @说明)' with answer.")
    cancel: str = doc("The statement that cancels (also :his_appointment, :reason).")
    hold: Optional[str] = doc("The statement that holds a slot (none: a hold is refused).", default=None)
    answer: Optional[str] = doc(
        "A statement run after the call on the same connection that reads its out-parameters, e.g. "
        "'SELECT @状态, @预约号, @说明' (MySQL/MariaDB); none: the call's own result row is the answer.",
        default=None)
    returns: list[Literal["status", "his_appointment", "message", "ignore"]] = doc(
        "What the answer row's columns are, in order (status is required).",
        default_factory=lambda: ["status", "his_appointment", "message"])
    answer_codes: AnswerCodes = doc("The HIS's codes in the status (a pending one: asked again later).",
                                    default_factory=AnswerCodes)

    def __post_validate__(self):
        issues = []
        for key in ("book", "cancel", "hold"):
            if getattr(self, key) is not None:
                issues += statement_issues(key, getattr(self, key))
        if "status" not in self.returns:
            issues.append(("returns", "the answer row needs its status column"))
        return issues


@dataclass(frozen=True)
class PrescriptionColumns:
    key: SqlName = doc("The gateway's idempotency key (the order message's control id), the same for every item of "
                       "one prescription and on every resend; with item, unique.")
    item: SqlName = doc("The item's id (the gateway's, its MedicationRequest's).")
    status: SqlName = doc("The HIS pharmacy's answer for the item (answer_codes); the gateway writes pending.")
    number: SqlName = doc("The prescription number (处方号).")
    drug_code: SqlName = doc("The drug's code, as pharmacy.drug_systems / drug_codes give it (药品代码).")
    quantity: SqlName = doc("The amount to dispense (数量).")
    drug_name: Optional[SqlName] = doc("The drug's name.", default=None)
    dose: Optional[SqlName] = doc("One dose's amount (单次剂量).", default=None)
    dose_unit: Optional[SqlName] = doc("Its unit.", default=None)
    route: Optional[SqlName] = doc("The route's code (给药途径).", default=None)
    frequency: Optional[SqlName] = doc("The frequency's code (频次, HL7 table 0335).", default=None)
    quantity_unit: Optional[SqlName] = doc("The dispense unit.", default=None)
    days: Optional[SqlName] = doc("Days of supply.", default=None)
    instructions: Optional[SqlName] = doc("Instructions for the patient.", default=None)
    patient_id: Optional[SqlName] = doc("The patient's first identifier.", default=None)
    patient_name: Optional[SqlName] = doc("The patient's name.", default=None)
    prescriber_id: Optional[SqlName] = doc("The prescriber's id.", default=None)
    prescriber_name: Optional[SqlName] = doc("The prescriber's name.", default=None)
    his_order: Optional[SqlName] = doc("The HIS's order number for the item, written by the HIS (read back).",
                                       default=None)
    message: Optional[SqlName] = doc("The HIS's text with its answer (why it refused).", default=None)
    created: Optional[SqlName] = doc("When the gateway wrote the row (the hospital's local time).", default=None)


@dataclass(frozen=True)
class PrescriptionTable:
    table: SqlName = doc("The intermediate table the gateway writes prescriptions into, one row per item (处方中间表).")
    columns: PrescriptionColumns = doc("Which column holds what.")
    answer_codes: AnswerCodes = doc("The HIS pharmacy's codes for its answer. The prescription is accepted when "
                                    "every item is; refused when one is.", default_factory=AnswerCodes)
    answer_poll: Annotated[Duration, Range(0.05, 60)] = doc(
        "How often the rows' status is read while the gateway waits (within the endpoint's ack_timeout).",
        default=Duration(0.5))


@dataclass(frozen=True)
class HisDatabaseConfig:
    url: str = doc("The SQLAlchemy URL of the HIS's database, without the password: "
                   "postgresql+psycopg://gw@10.1.2.5/his, mysql+pymysql://gw@10.1.2.5/his?charset=utf8mb4, "
                   "mssql+pyodbc://..., oracle+oracledb://... (the driver must be installed: pip install "
                   "'gatewayd[postgresql]' or '[mysql]').")
    password_file: Optional[ReadableFile] = doc("A file holding the database password (one line).", default=None)
    slots: Optional[SlotView] = doc("Where the HIS publishes its slots (none: slots come some other way).",
                                    default=None)
    bookings: Optional[BookingTable] = doc("Where the gateway writes bookings and cancellations.", default=None)
    procedures: Optional[BookingProcedures] = doc(
        "Bookings and cancellations through the HIS's stored procedures instead of an intermediate table "
        "(bookings).", default=None)
    prescriptions: Optional[PrescriptionTable] = doc(
        "Where the gateway writes prescriptions (an endpoint that routes send RDE^O11 or OMP^O09 to).", default=None)
    department_codes: dict[str, str] = doc(
        "The HIS's department codes the gateway publishes, each with its name (科室代码: 名称); a slot row with "
        "another code is refused. Empty: every code is taken as it is.", default_factory=dict)
    doctor_codes: dict[str, str] = doc(
        "The HIS's doctor codes the gateway publishes, each with its name; a slot row with another code is "
        "refused. Empty: every code is taken as it is.", default_factory=dict)
    threads: Annotated[int, Range(1, 32)] = doc(
        "Database connections (and the threads that use them, apart from the event loop) at most.", default=2)
    statement_timeout: Annotated[Duration, Range(0.1, 600)] = doc(
        "Longest one database call may take; then it is abandoned and the work retried.", default=Duration(10.0))
    connect_timeout: Annotated[Duration, Range(0.1, 600)] = doc("Timeout of a new database connection.",
                                                                default=Duration(5.0))
    local_time: Literal["naive", "utc"] = doc(
        "How the database's date-times without an offset are read and written: 'naive' = the hospital's local "
        "time (hospital.timezone), 'utc' = UTC.", default="naive")

    def __post_validate__(self):
        if not re.match(r"^[a-z][a-z0-9]*(\+[a-z0-9_]+)?://", self.url):
            return [("url", "expected an SQLAlchemy URL such as postgresql+psycopg://user@host/db")]
        if re.match(r"^[^/]*//[^/@]*:[^/@]*@", self.url):
            return [("url", "the URL carries a password: put it in password_file instead")]
        if self.bookings is not None and self.procedures is not None:
            return [("procedures", "give bookings (an intermediate table) or procedures, not both")]
        if self.slots is None and self.bookings is None and self.prescriptions is None and self.procedures is None:
            return [("bookings", "give bookings (the table the gateway writes), slots (the view it reads), "
                                 "prescriptions, or several")]
        return []
