"""A light ER7 ("pipe and hat") reader and writer for HL7 v2 messages on the hot path. (One module of ~700
lines: the reader and the writer share the delimiters, the escape rules and the charset rules, and each half
would need the other's internals.)

Why our own: hl7apy builds a full object model and costs ~7 ms per 6-segment SIU; python-hl7 ~0.23 ms.
The gateway only needs to find a handful of fields in each message, so this module splits a message into
segments and fields once (C-level ``str.split``) and leaves components, repetitions, subcomponents and
escape sequences to be resolved lazily when a field is asked for. hl7apy remains the tool for strict
validation and for tests.

Measured (``timeit``, best of 7 x 20,000, CPython 3.11, this 2-core host): ``parse()`` of the 7-segment
SIU^S12 used in tests/unit/test_er7.py (MSH SCH PID RGS AIS AIL AIP, 389 bytes, UTF-8) takes 6.9 us; the
same message in GB18030 with Chinese names 8.8 us; parse plus six typical field reads 10.8 us; `build_ack`
of an AA 5.1 us. Target was < 100 us (hl7apy: ~6,800 us; python-hl7: ~230 us).

Reading rules (see also docs/hl7-profile.md):

* The data must start with ``MSH`` (else `Hl7Error` 100). MSH-1 is the byte after ``MSH``; MSH-2 (the
  encoding characters) must be 4 characters, or 5 when a v2.7 truncation character is present, and all of
  them ASCII (one byte in every charset; else 102).
* Segment separator: if the data contains a CR anywhere, segments are split on CR only and a LF directly
  after a CR is dropped (CRLF senders); a bare LF elsewhere is data (e.g. inside NTE text). Data without any
  CR is split on LF. Empty (or whitespace-only) segments are skipped wherever they occur, so trailing
  separators and blank lines do no harm.
* Segment names must be three upper-case letters or digits (else 100, ``sequence`` = the segment's position
  in the message, since a bad name has no meaningful occurrence count; ``segment`` = the bad name's first
  three characters when printable ASCII, else None).
* MSH-9 (component 1), MSH-10 and MSH-12 are required (else 101 naming the field).
* Character set: the first segment is read as latin-1 (MSH-1..MSH-18 are ASCII in practice) to find MSH-18;
  `charset_codec` maps it (empty -> the configured default, e.g. ``gb18030`` for a HIS that leaves it
  empty) and the whole message is decoded with that codec before splitting, so multi-byte characters whose
  trail bytes equal ``|``/``^``/``~``/``\\`` (possible in GBK/GB18030) are never split. A decoding failure is
  102 on MSH-18 naming the charset; an unknown MSH-18 value is 103. A GBK/GB18030 character whose second
  byte is 0x7C (``|``, e.g. 億 = 83 7C) in MSH-3..MSH-17 (a Chinese facility name) would shift a latin-1
  count of fields, so when the MSH has non-ASCII bytes it is also read as GB18030: if that reading finds a
  GB charset in MSH-18 (or finds MSH-18 empty while the default charset is a GB one and the byte-by-byte
  reading names no charset: UTF-8 bytes read as GB18030 can take a ``|`` into a character too) it wins.
  UTF-8 needs no such care: no byte of a UTF-8 multi-byte character is ASCII. A message whose decoded MSH-18 then names
  another charset than the one it was decoded with (the two readings disagree) is ambiguous: 102 on MSH-18.

Values returned by `Segment.get` / `Segment.components` are unescaped; `Segment.raw` is the wire text.
Writing is the caller's job to escape (`escape`) and `format_message` only ends every segment with CR (the
last one too, as the standard's segment terminator requires), so the hot path for ACKs is plain string
formatting.

Deliberate leniencies: 0x1C/0x0B never reach the parser (the MLLP framer owns them); unknown escape
sequences (``\\H\\``, ``\\N\\``, ``\\Zxx\\`` ...) and ``\\X..\\`` sequences that are malformed or not decodable in
the message charset are kept verbatim, and an unterminated escape character is a literal. Nothing here logs.
"""

from __future__ import annotations

import codecs
import functools
import re
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import datetime, timedelta, timezone

__all__ = [
    "TABLE_0357",
    "Encoding",
    "Hl7Error",
    "Message",
    "Segment",
    "charset_codec",
    "dtm",
    "escape",
    "format_message",
    "hl7_charset_name",
    "parse",
    "parse_dtm",
    "unescape",
]

#: HL7 table 0357 (message error condition codes), v2.5.
TABLE_0357: dict[int, str] = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}


class Hl7Error(ValueError):
    """A message we cannot accept.

    Attributes:
      code: int, HL7 table 0357 (100 segment sequence error, 101 required field missing, 102 data type
        error, 103 table value not found, 200 unsupported message type, 201 unsupported event code, 203
        unsupported version id, 207 application internal error).
      segment: str | None, e.g. ``'MSH'``.
      sequence: int, 1-based occurrence of that segment (for an invalid segment name: its position).
      field: int | None.
      text: str, human readable, never contains message contents beyond positions and codes.

    ``str(err)`` reads like ``HL7 101 Required field missing at MSH-10: MSH-10 (message control id) is
    empty``. The location keywords are keyword-only: ``Hl7Error(101, 'why', segment='MSH', field=10)``.
    """

    def __init__(
        self,
        code: int,
        text: str = "",
        *,
        segment: str | None = None,
        sequence: int = 1,
        field: int | None = None,
    ) -> None:
        super().__init__(code, text)
        self.code = int(code)
        self.text = text or TABLE_0357.get(self.code, "error")
        self.segment = segment
        self.sequence = sequence
        self.field = field

    @property
    def location(self) -> str:
        """``'SCH-5'``, ``'SCH[2]-5'`` (second SCH), ``'MSH'``, or ``''`` when unknown."""
        if not self.segment:
            return ""
        loc = self.segment if self.sequence == 1 else f"{self.segment}[{self.sequence}]"
        return loc if self.field is None else f"{loc}-{self.field}"

    def __str__(self) -> str:
        where = self.location
        head = f"HL7 {self.code} {TABLE_0357.get(self.code, 'error')}"
        return f"{head} at {where}: {self.text}" if where else f"{head}: {self.text}"

    def __repr__(self) -> str:
        return f"Hl7Error(code={self.code}, location={self.location!r}, text={self.text!r})"


@dataclass(frozen=True)
class Encoding:
    """The delimiters of one message (MSH-1 and MSH-2). ``truncation`` is the v2.7 truncation character
    (5th character of MSH-2), ``None`` when MSH-2 has 4 characters."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str | None = None
    # caches, derived in __post_init__ (not part of equality/hash)
    _escape_table: dict = dc_field(default=None, init=False, repr=False, compare=False, hash=False)
    _unescape_map: dict = dc_field(default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        chars = [self.field, self.component, self.repetition, self.escape, self.subcomponent]
        if self.truncation is not None:
            chars.append(self.truncation)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1 or c.isalnum() or c in "\r\n":
                raise ValueError(f"invalid HL7 delimiter {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError(f"HL7 delimiters must be distinct: {''.join(chars)!r}")
        e = self.escape
        # Control characters (C0 and DEL) as \Xhh\: CR and LF (never a segment break inside a field), the MLLP
        # block bytes 0x0B/0x1C (never let text break the framing), NUL and the rest (no raw control byte
        # reaches the HIS, whatever a value holds).
        table = {c: f"{e}X{c:02X}{e}" for c in (*range(0x20), 0x7F)}
        table.update({
            ord(e): f"{e}E{e}",
            ord(self.field): f"{e}F{e}",
            ord(self.component): f"{e}S{e}",
            ord(self.subcomponent): f"{e}T{e}",
            ord(self.repetition): f"{e}R{e}",
        })
        unmap = {
            "F": self.field,
            "S": self.component,
            "T": self.subcomponent,
            "R": self.repetition,
            "E": e,
            ".br": "\n",
        }
        if self.truncation is not None:
            table[ord(self.truncation)] = f"{e}P{e}"
            unmap["P"] = self.truncation
        object.__setattr__(self, "_escape_table", table)
        object.__setattr__(self, "_unescape_map", unmap)

    @property
    def msh2(self) -> str:
        """The encoding characters as written in MSH-2."""
        return self.component + self.repetition + self.escape + self.subcomponent + (self.truncation or "")


_DEFAULT_ENCODING = Encoding()
_ENCODINGS: dict[tuple[str, str], Encoding] = {("|", "^~\\&"): _DEFAULT_ENCODING}


def _encoding_for(fs: str, msh2: str) -> Encoding:
    """Encoding for MSH-1/MSH-2, cached (a handful of distinct values ever occur)."""
    enc = _ENCODINGS.get((fs, msh2))
    if enc is None:
        if not (fs + msh2).isascii():  # one byte in every charset only then: else the decoded text splits otherwise
            raise Hl7Error(102, "MSH-1/MSH-2 delimiters must be ASCII characters", segment="MSH",
                           field=1 if not fs.isascii() else 2)
        if len(msh2) not in (4, 5):
            raise Hl7Error(
                102,
                f"MSH-2 (encoding characters) must have 4 or 5 characters, has {len(msh2)}",
                segment="MSH",
                field=2,
            )
        try:
            enc = Encoding(fs, msh2[0], msh2[1], msh2[2], msh2[3], msh2[4] if len(msh2) == 5 else None)
        except ValueError as exc:
            raise Hl7Error(102, f"MSH-1/MSH-2 delimiters unusable: {exc}", segment="MSH", field=2) from None
        if len(_ENCODINGS) < 64:
            _ENCODINGS[(fs, msh2)] = enc
    return enc


# --------------------------------------------------------------------------------------------- escaping

_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+\Z")


def escape(text: str, enc: Encoding = _DEFAULT_ENCODING) -> str:
    """Escape ``text`` for use as one field/component value: the delimiters become ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``
    (and ``\\P\\`` for a truncation character), CR and LF become ``\\X0D\\`` / ``\\X0A\\``, and every other
    control character (C0 and DEL: the MLLP block bytes 0x0B / 0x1C, NUL, TAB ...) ``\\Xhh\\`` too (an addition:
    escaped text can always be framed, and carries no raw control byte)."""
    return text.translate(enc._escape_table)


def unescape(text: str, enc: Encoding = _DEFAULT_ENCODING, charset: str = "utf-8") -> str:
    """Resolve escape sequences in a value read from the wire.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (and ``\\P\\`` when the encoding has a truncation character) give back the
    delimiters, ``\\.br\\`` gives ``'\\n'``, ``\\Xhh..\\`` gives the bytes decoded with ``charset`` (the message's
    codec). Unknown or undecodable sequences are kept verbatim; an escape character with no closing one is a
    literal. ``charset`` is an addition to the published signature (defaults keep it compatible).
    """
    e = enc.escape
    j = text.find(e)
    if j < 0:
        return text
    mapping = enc._unescape_map
    out: list[str] = []
    i = 0
    while j >= 0:
        out.append(text[i:j])
        k = text.find(e, j + 1)
        if k < 0:  # unterminated: literal escape character and the rest
            i = j
            break
        seq = text[j + 1 : k]
        if not seq:
            # two escape characters in a row: the first is a literal, the second may open a sequence
            out.append(e)
            i = k
            j = k
            continue
        rep = mapping.get(seq)
        if rep is None:
            rep = text[j : k + 1]
            if seq[0] == "X" and _HEX.match(seq, 1):
                try:
                    rep = bytes.fromhex(seq[1:]).decode(charset)
                except (UnicodeDecodeError, LookupError):
                    pass
        out.append(rep)
        i = k + 1
        j = text.find(e, i)
    out.append(text[i:])
    return "".join(out)


# ------------------------------------------------------------------------------------------ data model


class Segment:
    """One segment. Fields are numbered as in the HL7 standard: ``get(3)`` is PID-3; for MSH, field 1 is
    the field separator and field 2 the encoding characters (both returned verbatim).

    ``fields`` given to the constructor is that numbering already: ``fields[0]`` is the segment name and, for
    MSH, ``fields[1]`` the field separator. `parse` builds these; tests and tools may too.
    """

    __slots__ = ("_charset", "_enc", "_fields", "name")

    def __init__(self, fields: list[str], encoding: Encoding = _DEFAULT_ENCODING, charset: str = "utf-8"):
        self.name: str = fields[0]
        self._fields = fields
        self._enc = encoding
        self._charset = charset

    def __repr__(self) -> str:  # never the contents: they may be patient data
        return f"<Segment {self.name} with {len(self._fields) - 1} fields>"

    def er7(self) -> str:
        """The segment as it was on the wire (decoded to text, escapes kept), without its terminator.  Not for
        MSH, whose field 1 is the separator itself."""
        return self._enc.field.join(self._fields)

    @property
    def field_count(self) -> int:
        """Number of fields present on the wire (trailing empty fields included)."""
        return len(self._fields) - 1

    def raw(self, field: int) -> str:
        """The field exactly as on the wire (escapes and separators intact), ``''`` when absent."""
        if field < 1:
            raise ValueError(f"HL7 field numbers start at 1, got {field}")
        fields = self._fields
        return fields[field] if field < len(fields) else ""

    def _repetition(self, field: int, repetition: int) -> str:
        value = self.raw(field)
        if not value:
            return ""
        if self.name == "MSH" and field <= 2:
            return value if repetition == 0 else ""
        rs = self._enc.repetition
        if rs in value:
            reps = value.split(rs)
            return reps[repetition] if repetition < len(reps) else ""
        return value if repetition == 0 else ""

    def get(self, field: int, component: int = 1, repetition: int = 0, subcomponent: int = 1) -> str:
        """Unescaped text of one (sub)component of one repetition of a field; ``''`` when absent.
        ``repetition`` is 0-based, ``component`` and ``subcomponent`` 1-based (HL7 numbering)."""
        # The hot path of every message read (~30 calls per SIU): the field is looked up here, not through
        # raw() and _repetition(), and each separator is looked for only in what is left.
        if component < 1 or subcomponent < 1 or repetition < 0:
            raise ValueError("component/subcomponent are 1-based, repetition 0-based")
        fields = self._fields
        if field < 1:
            raise ValueError(f"HL7 field numbers start at 1, got {field}")
        if field >= len(fields):
            return ""
        value = fields[field]
        if not value:
            return ""
        if field <= 2 and self.name == "MSH":
            return value if repetition == 0 and component == 1 and subcomponent == 1 else ""
        enc = self._enc
        rs = enc.repetition
        if rs in value:
            reps = value.split(rs)
            value = reps[repetition] if repetition < len(reps) else ""
            if not value:
                return ""
        elif repetition:
            return ""
        cs = enc.component
        if cs in value:
            parts = value.split(cs)
            value = parts[component - 1] if component <= len(parts) else ""
        elif component != 1:
            return ""
        ss = enc.subcomponent
        if ss in value:
            parts = value.split(ss)
            value = parts[subcomponent - 1] if subcomponent <= len(parts) else ""
        elif subcomponent != 1:
            return ""
        if enc.escape in value:
            return unescape(value, enc, self._charset)
        return value

    def repetitions(self, field: int) -> int:
        """How many repetitions the field has (0 when empty or absent)."""
        value = self.raw(field)
        if not value:
            return 0
        if self.name == "MSH" and field <= 2:
            return 1
        return value.count(self._enc.repetition) + 1

    def components(self, field: int, repetition: int = 0) -> list[str]:
        """The unescaped components of one repetition (``[]`` when empty or absent). Subcomponent
        separators inside a component are left as they are; use ``get(..., subcomponent=n)`` for those."""
        value = self._repetition(field, repetition)
        if not value:
            return []
        if self.name == "MSH" and field <= 2:
            return [value]
        enc = self._enc
        parts = value.split(enc.component)
        if enc.escape in value:
            cs = self._charset
            return [unescape(p, enc, cs) for p in parts]
        return parts


class Message:
    """A parsed message: its segments in order plus what was needed to read them."""

    __slots__ = ("_code", "_control_id", "_trigger", "_version", "charset", "encoding", "raw", "segments")

    def __init__(self, segments: list[Segment], encoding: Encoding, charset: str, raw: bytes):
        self.segments = segments
        self.encoding = encoding
        self.charset = charset
        self.raw = raw
        # MSH-9.1, MSH-9.2, MSH-10 and MSH-12, read once: every layer asks for them (the gate, the map, the ACK,
        # the log)
        self._code: str | None = None
        self._version: str | None = None
        self._trigger: str | None = None
        self._control_id: str | None = None

    def __repr__(self) -> str:
        return f"<Message {self.type_name} control_id={self.control_id!r} {len(self.segments)} segments>"

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def control_id(self) -> str:
        """MSH-10."""
        value = self._control_id
        if value is None:
            value = self._control_id = self.segments[0].get(10)
        return value

    @property
    def message_code(self) -> str:
        """MSH-9.1, e.g. ``'SIU'``."""
        value = self._code
        if value is None:
            value = self._code = self.segments[0].get(9)
        return value

    @property
    def trigger(self) -> str:
        """MSH-9.2, e.g. ``'S12'``."""
        value = self._trigger
        if value is None:
            value = self._trigger = self.segments[0].get(9, 2)
        return value

    @property
    def structure(self) -> str:
        """MSH-9.3, e.g. ``'SIU_S12'``, or ``''``."""
        return self.segments[0].get(9, 3)

    @property
    def version(self) -> str:
        """MSH-12.1, e.g. ``'2.5'``."""
        value = self._version
        if value is None:
            value = self._version = self.segments[0].get(12)
        return value

    @property
    def type_name(self) -> str:
        """``'SIU^S12'``; just the code (``'ACK'``) when MSH-9 has no trigger event."""
        trigger = self.trigger
        return f"{self.message_code}^{trigger}" if trigger else self.message_code

    @property
    def sending_application(self) -> str:
        return self.segments[0].get(3)

    @property
    def sending_facility(self) -> str:
        return self.segments[0].get(4)

    @property
    def receiving_application(self) -> str:
        return self.segments[0].get(5)

    @property
    def receiving_facility(self) -> str:
        return self.segments[0].get(6)

    @property
    def accept_ack_type(self) -> str:
        """MSH-15 (``''`` in original mode)."""
        return self.segments[0].get(15)

    @property
    def application_ack_type(self) -> str:
        """MSH-16 (``''`` in original mode)."""
        return self.segments[0].get(16)

    def segment(self, name: str) -> Segment | None:
        """The first segment called ``name``, or None."""
        for seg in self.segments:
            if seg.name == name:
                return seg
        return None

    def all(self, name: str) -> list[Segment]:
        """Every segment called ``name``, in order."""
        return [seg for seg in self.segments if seg.name == name]

    def groups(self, start: str) -> list[list[Segment]]:
        """Each occurrence of segment ``start`` together with the segments after it, up to the next
        ``start`` (segments before the first ``start`` belong to no group). For SQR^S25's SCH groups the
        trailing DSC ends up in the last group; readers look segments up by name."""
        out: list[list[Segment]] = []
        current: list[Segment] | None = None
        for seg in self.segments:
            if seg.name == start:
                current = [seg]
                out.append(current)
            elif current is not None:
                current.append(seg)
        return out


# ------------------------------------------------------------------------------------------- charsets

# HL7 table 0211 (and common spellings seen in the wild) -> python codec. Keys are upper-cased with spaces
# removed. GB2312 and GBK are subsets of GB18030, so one codec reads all three.
_CHARSETS: dict[str, str] = {
    "UNICODEUTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "GB18030-2000": "gb18030",
    "GB18030-2005": "gb18030",
    "GB18030": "gb18030",
    "GBK": "gb18030",
    "GB2312": "gb18030",
    "ASCII": "ascii",
    "8859/1": "latin-1",
    **{f"8859/{n}": f"iso8859-{n}" for n in range(2, 10)},
    "8859/15": "iso8859-15",
}

_HL7_NAMES: dict[str, str] = {
    "utf-8": "UNICODE UTF-8",
    "gb18030": "GB 18030-2000",
    "gbk": "GB 18030-2000",
    "gb2312": "GB 18030-2000",
    "ascii": "ASCII",
    "iso8859-1": "8859/1",
    **{f"iso8859-{n}": f"8859/{n}" for n in range(2, 10)},
    "iso8859-15": "8859/15",
}


@functools.lru_cache(maxsize=128)
def charset_codec(msh18: str, default: str) -> str:
    """Python codec for an MSH-18 value (HL7 table 0211). ``''`` -> ``default``; ``'UNICODE UTF-8'`` ->
    ``'utf-8'``; ``'GB 18030-2000'``, ``'GB18030'``, ``'GBK'``, ``'GB2312'`` -> ``'gb18030'``; ``'ASCII'``;
    ``'8859/1'`` -> ``'latin-1'``; ``'8859/2'``..``'8859/9'``, ``'8859/15'`` -> ``'iso8859-N'``. Anything
    else raises `Hl7Error` 103 on MSH-18."""
    key = msh18.strip().upper().replace(" ", "")
    if not key:
        return default
    codec = _CHARSETS.get(key)
    if codec is None:
        raise Hl7Error(103, f"MSH-18 character set {msh18.strip()[:40]!r} is not supported", segment="MSH",
                       field=18)
    return codec


def hl7_charset_name(codec: str) -> str:
    """MSH-18 value for a python codec name (the inverse of `charset_codec`): ``'utf-8'`` -> ``'UNICODE
    UTF-8'``, ``'gb18030'`` (and ``'gbk'``/``'gb2312'``) -> ``'GB 18030-2000'``, ``'latin-1'`` -> ``'8859/1'``
    ... Raises ValueError for a codec HL7 has no name for (a configuration error, not a message error)."""
    try:
        name = codecs.lookup(codec).name
    except LookupError:
        raise ValueError(f"unknown codec {codec!r}") from None
    hl7 = _HL7_NAMES.get(name)
    if hl7 is None:
        raise ValueError(f"codec {codec!r} has no HL7 table 0211 name")
    return hl7


# ---------------------------------------------------------------------------------------------- parse

_SEGMENT_NAME = re.compile(r"[A-Z0-9]{3}\Z")
_KNOWN_NAMES: set[str] = set()


def _msh18(msh_fields: list[str], enc: Encoding) -> str:
    """MSH-18's first repetition, first component, from the MSH split on the field separator (where
    ``msh_fields[1]`` is MSH-2)."""
    msh18 = msh_fields[17] if len(msh_fields) > 17 else ""
    if msh18:
        msh18 = msh18.split(enc.repetition, 1)[0].split(enc.component, 1)[0]
    return msh18


@functools.lru_cache(maxsize=16)
def _is_gb(codec: str) -> bool:
    try:
        return codecs.lookup(codec).name in ("gb18030", "gbk", "gb2312")
    except LookupError:
        return False


def parse(data: bytes, default_charset: str = "utf-8") -> Message:
    """Parse one ER7 message (the payload of one MLLP frame). Raises `Hl7Error`; see the module docstring
    for the rules. ``default_charset`` is the python codec used when MSH-18 is empty."""
    data = bytes(data)
    if data[:3] != b"MSH":
        raise Hl7Error(100, "message does not start with an MSH segment", segment="MSH")
    sep = b"\r" if b"\r" in data else b"\n"
    end = data.find(sep)
    head = (data if end < 0 else data[:end]).decode("latin-1")
    if len(head) < 8:
        raise Hl7Error(100, "MSH segment is truncated", segment="MSH")
    fs = head[3]
    msh_fields = head.split(fs)
    enc = _encoding_for(fs, msh_fields[1])

    msh18 = _msh18(msh_fields, enc)
    if not head.isascii():
        gb18 = _msh18((data if end < 0 else data[:end]).decode("gb18030", errors="replace").split(fs), enc)
        if _CHARSETS.get(gb18.strip().upper().replace(" ", "")) == "gb18030" or (
            not gb18.strip() and _is_gb(default_charset) and msh18.strip().upper().replace(" ", "") not in _CHARSETS
        ):
            msh18 = gb18
    charset = charset_codec(msh18, default_charset)
    try:
        text = data.decode(charset)
    except UnicodeDecodeError as exc:
        label = f"MSH-18 {msh18.strip()!r}" if msh18.strip() else "MSH-18 empty, configured default"
        raise Hl7Error(
            102,
            f"message is not valid {charset} ({label}): byte 0x{data[exc.start]:02X} at offset {exc.start}",
            segment="MSH",
            field=18,
        ) from None
    except LookupError:
        raise Hl7Error(207, f"character set codec {charset!r} is unknown to this system", segment="MSH",
                       field=18) from None

    if sep == b"\r":
        if "\r\n" in text:
            text = text.replace("\r\n", "\r")
        parts = text.split("\r")
    else:
        parts = text.split("\n")
    if not head.isascii() and charset_codec(_msh18(parts[0].split(fs), enc), default_charset) != charset:
        raise Hl7Error(102, f"MSH-18 names another character set once the message is read as {charset} (a "
                            f"multi-byte character in the MSH shifts its fields): the character set is ambiguous",
                       segment="MSH", field=18)

    segments: list[Segment] = []
    known = _KNOWN_NAMES
    position = 0
    for part in parts:
        if not part or part.isspace():
            continue
        position += 1
        fields = part.split(fs)
        name = fields[0]
        if name not in known:
            if not _SEGMENT_NAME.match(name):
                shown = name[:3] if name[:3].isascii() and name[:3].isprintable() else ""
                raise Hl7Error(
                    100,
                    f"segment {position} has an invalid name {name[:4]!r}... (3 upper-case letters/digits)",
                    segment=shown or None,
                    sequence=position,
                )
            known.add(name)
        if name == "MSH":
            fields.insert(1, fs)
        segments.append(Segment(fields, enc, charset))

    msh = segments[0]
    code = msh.get(9)
    if not code:
        raise Hl7Error(101, "MSH-9 (message type) is empty", segment="MSH", field=9)
    if not msh.raw(10):
        raise Hl7Error(101, "MSH-10 (message control id) is empty", segment="MSH", field=10)
    version = msh.get(12)
    if not version:
        raise Hl7Error(101, "MSH-12 (version id) is empty", segment="MSH", field=12)
    message = Message(segments, enc, charset, data)
    message._code, message._version = code, version  # (read here already)
    return message


# --------------------------------------------------------------------------------------------- writing


def format_message(segments: list[list[str]], enc: Encoding = _DEFAULT_ENCODING) -> str:
    """Join already-escaped segments into ER7 text. Each segment is ``[name, field1, field2, ...]``; for MSH
    pass ``['MSH', enc.msh2, MSH-3, ...]`` (element 1 is MSH-2, the field separator goes in between
    naturally). Every segment ends with CR, the last one included (HL7 v2.5 section 2.5.1: "each segment
    ... is terminated by the segment terminator <cr>"); encode the result in the message charset. Nothing
    is validated: this is the hot path."""
    fs = enc.field
    return "".join([fs.join(seg) + "\r" for seg in segments])


# ----------------------------------------------------------------------------------------- date/times


def dtm(value: datetime) -> str:
    """``'YYYYMMDDHHMMSS'`` of the wall-clock fields of ``value`` (any tzinfo is not written: our profile
    exchanges local hospital time without an offset)."""
    return (
        f"{value.year:04d}{value.month:02d}{value.day:02d}"
        f"{value.hour:02d}{value.minute:02d}{value.second:02d}"
    )


_DTM = re.compile(
    r"(\d{4})(\d{2})(\d{2})"  # date
    r"(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6})\d*)?)?)?)?"  # [HH[MM[SS[.S+]]]]
    r"(?:([+-])(\d{2})(\d{2}))?\Z"  # [+/-ZZZZ]
)


def parse_dtm(s: str) -> datetime:
    """Read an HL7 DTM: ``YYYYMMDD[HH[MM[SS[.S+]]]][+/-ZZZZ]``. Returns a naive datetime, or an aware one when
    an offset is present. Surrounding whitespace is ignored. Raises `Hl7Error` 102 on anything else
    (including impossible dates); the caller adds segment/field by catching and re-raising if it needs
    them."""
    m = _DTM.match(s.strip())
    if m is None:
        raise Hl7Error(102, f"not an HL7 date/time: {s[:30]!r}")
    year, month, day, hh, mm, ss, frac, sign, oh, om = m.groups()
    tz = None
    if sign:
        offset = timedelta(hours=int(oh), minutes=int(om))
        if offset >= timedelta(hours=24):
            raise Hl7Error(102, f"UTC offset out of range: {s[:30]!r}")
        tz = timezone(-offset if sign == "-" else offset)
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hh or 0),
            int(mm or 0),
            int(ss or 0),
            int((frac or "0").ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError:
        raise Hl7Error(102, f"impossible date/time: {s[:30]!r}") from None
