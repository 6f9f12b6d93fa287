"""Unit tests of the ER7 reader/writer (adapters.hl7.er7) and the ACK builder/reader (adapters.hl7.ack)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.hl7.ack import (
    build_ack,
    build_nak_for_unparseable,
    read_ack,
    salvage_control_id,
)
from adapters.hl7.er7 import (
    Encoding,
    Hl7Error,
    Segment,
    charset_codec,
    dtm,
    escape,
    format_message,
    hl7_charset_name,
    parse,
    parse_dtm,
    unescape,
)
from adapters.inner.framing import frame

NOW = datetime(2024, 3, 1, 8, 30, 5)

SIU_SEGMENTS = [
    "MSH|^~\\&|HIS|HOSP|GATEWAYD|GW|20240301083000||SIU^S12^SIU_S12|MSG00001|P|2.5|||||CHN|{charset}",
    "SCH||HA123^HIS||||S12^booked|||30|MIN|^^30^202403011000^202403011030|||||||||||||Booked",
    "PID|1||110101199003071234^^^CHN^RRI~MR0001^^^HOSP^MR||{name}||19900307|M|||||13800138000",
    "RGS|1",
    "AIS|1||GEN^General medicine|202403011000|||30|MIN",
    "AIL|1||D01^^^^^^^^Internal medicine",
    "AIP|1||DOC1^Li^Na",
]


def siu(charset: str = "UNICODE UTF-8", name: str = "Zhang^Wei", sep: str = "\r") -> str:
    return sep.join(s.format(charset=charset, name=name) for s in SIU_SEGMENTS) + sep


def ack_kwargs(**over):
    kw = {"sending_application": "GATEWAYD", "sending_facility": "GW1", "control_id": "ACK0001", "now": NOW}
    kw.update(over)
    return kw


# ------------------------------------------------------------------------------------------ reading


def test_header_properties():
    """The MSH accessors return the documented components (MSH-9.1/.2/.3, MSH-10, MSH-12, MSH-3..6)."""
    m = parse(siu().encode())
    assert (m.message_code, m.trigger, m.structure, m.type_name) == ("SIU", "S12", "SIU_S12", "SIU^S12")
    assert m.control_id == "MSG00001"
    assert m.version == "2.5"
    assert (m.sending_application, m.sending_facility) == ("HIS", "HOSP")
    assert (m.receiving_application, m.receiving_facility) == ("GATEWAYD", "GW")
    assert (m.accept_ack_type, m.application_ack_type) == ("", "")
    assert m.charset == "utf-8"
    assert m.raw == siu().encode()
    assert [s.name for s in m.segments] == ["MSH", "SCH", "PID", "RGS", "AIS", "AIL", "AIP"]


def test_msh_field_numbering():
    """MSH-1 is the field separator and MSH-2 the encoding characters, returned verbatim (not split)."""
    msh = parse(siu().encode()).msh
    assert msh.get(1) == "|" and msh.raw(1) == "|"
    assert msh.get(2) == "^~\\&" and msh.raw(2) == "^~\\&"
    assert msh.repetitions(2) == 1
    assert msh.get(3) == "HIS"
    assert msh.get(7) == "20240301083000"
    assert msh.get(18) == "UNICODE UTF-8"


def test_fields_components_repetitions_subcomponents():
    """get() addresses fields, 1-based components, 0-based repetitions and 1-based subcomponents; absent
    parts are ''."""
    m = parse(siu().encode())
    pid = m.segment("PID")
    assert pid.repetitions(3) == 2
    assert pid.get(3) == "110101199003071234"
    assert pid.get(3, 5) == "RRI"
    assert pid.get(3, 1, 1) == "MR0001"
    assert pid.get(3, 4, 1) == "HOSP"
    assert pid.get(3, 1, 2) == ""  # no third repetition
    assert pid.components(3, 1) == ["MR0001", "", "", "HOSP", "MR"]
    assert pid.get(5, 1) == "Zhang" and pid.get(5, 2) == "Wei" and pid.get(5, 3) == ""
    assert pid.get(99) == "" and pid.raw(99) == "" and pid.repetitions(99) == 0 and pid.components(99) == []
    assert m.segment("AIL").get(3, 9) == "Internal medicine"
    assert m.segment("SCH").get(11, 4) == "202403011000"
    seg = Segment(["ZXX", "a&b&c^d", "plain"])
    assert seg.get(1, 1, 0, 2) == "b" and seg.get(1, 1, 0, 3) == "c" and seg.get(1, 1, 0, 4) == ""
    assert seg.get(1, 2) == "d" and seg.get(2, 1, 0, 2) == "" and seg.get(2, 2) == ""
    assert seg.raw(1) == "a&b&c^d"


def test_segment_lookup_and_groups():
    """segment()/all() find segments by name; groups('SCH') cuts an SQR^S25 into one group per SCH with the
    segments that follow it."""
    text = "\r".join(
        [
            "MSH|^~\\&|HIS|H|GW|G|20240301||SQR^S25^SQR_S25|Q1|P|2.5",
            "MSA|AA|G1",
            "QRD|20240301|R|I|Q1|||999^RD|ALL|SCH|ALL",
            "SCH||A1" + "|" * 23 + "Open",
            "RGS|1",
            "AIS|1||GEN",
            "SCH||A2" + "|" * 23 + "Booked",
            "RGS|1",
            "AIP|1||DOC1",
            "DSC|",
        ]
    ).encode()
    m = parse(text)
    groups = m.groups("SCH")
    assert [[s.name for s in g] for g in groups] == [["SCH", "RGS", "AIS"], ["SCH", "RGS", "AIP", "DSC"]]
    assert [g[0].get(2) for g in groups] == ["A1", "A2"]
    assert [g[0].get(25) for g in groups] == ["Open", "Booked"]
    assert len(m.all("RGS")) == 2 and m.segment("ZZZ") is None and m.all("ZZZ") == []
    assert m.groups("ZZZ") == []


def test_unescaped_values_and_raw():
    """get() unescapes, raw() returns the wire text, and escaped delimiters do not split fields/components."""
    msg = "MSH|^~\\&|A|B|C|D|20240301||ADT^A01|X1|P|2.5\rNTE|1||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f^second\r"
    nte = parse(msg.encode()).segment("NTE")
    assert nte.get(3) == "a|b^c&d~e\\f"
    assert nte.get(3, 2) == "second"
    assert nte.raw(3) == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f^second"
    assert nte.components(3) == ["a|b^c&d~e\\f", "second"]


# ----------------------------------------------------------------------------------------- escaping


@pytest.mark.parametrize(
    "wire, text",
    [
        ("\\F\\\\S\\\\T\\\\R\\\\E\\", "|^&~\\"),  # consecutive escapes
        ("end\\E\\", "end\\"),  # \E\ at the very end of a field
        ("line1\\.br\\line2", "line1\nline2"),
        ("a\\X0D\\b\\X0A\\c", "a\rb\nc"),
        ("\\X0D0A\\", "\r\n"),  # several bytes in one \X..\
        ("\\XE5BCA0\\", "张"),  # UTF-8 bytes decoded with the message charset
        ("keep \\H\\bold\\N\\ as is", "keep \\H\\bold\\N\\ as is"),  # unknown sequences verbatim
        ("bad hex \\XZZ\\ and \\X0\\", "bad hex \\XZZ\\ and \\X0\\"),  # malformed \X kept verbatim
        ("dangling \\", "dangling \\"),  # unterminated escape char is a literal
        ("dangling \\F", "dangling \\F"),
        ("\\\\F\\", "\\|"),  # empty sequence: first escape literal, second opens \F\
    ],
)
def test_unescape_cases(wire, text):
    """Each escape-sequence case from the known parser bug classes reads back to the right text."""
    assert unescape(wire) == text


def test_unescape_hex_uses_message_charset():
    """\\Xhh..\\ bytes are decoded with the message charset: GB18030 bytes give Chinese in a GB18030 message;
    bytes the charset cannot decode are kept verbatim."""
    assert unescape("\\XD5C5\\", charset="gb18030") == "张"
    assert unescape("\\XFF\\", charset="utf-8") == "\\XFF\\"
    msg = "MSH|^~\\&|A|B|C|D|20240301||ADT^A01|X1|P|2.5|||||CHN|GB 18030-2000\rNTE|1||\\XD5C5\\\r"
    assert parse(msg.encode("gb18030")).segment("NTE").get(3) == "张"


def test_escape_produces_standard_sequences():
    """escape() writes \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ and turns CR/LF into \\X0D\\/\\X0A\\ (never a raw segment
    separator inside a field), and the MLLP block bytes into \\X0B\\/\\X1C\\."""
    assert escape("a|b^c&d~e\\f\rg\nh") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\X0D\\g\\X0A\\h"
    assert escape("a\x0bb\x1cc") == "a\\X0B\\b\\X1C\\c"  # MLLP block bytes never reach the wire raw
    assert escape("plain") == "plain"
    assert escape("张伟") == "张伟"


def test_escape_writes_no_control_byte():
    """Finding 7, defensively at the encoder: NUL and every other C0 control character (and DEL) become
    \\Xhh\\, so no raw control byte reaches the HIS whatever a value holds (a NUL from a platform used to
    be written as a raw 0x00 in PID-5); the reader gives the characters back."""
    controls = "".join(chr(c) for c in [*range(0x20), 0x7F])
    wire = escape(f"a{controls}b")
    assert wire == "a" + "".join(f"\\X{c:02X}\\" for c in [*range(0x20), 0x7F]) + "b"
    assert not any(c in wire for c in controls)
    assert unescape(wire) == f"a{controls}b"
    custom = Encoding(field="!", component="@", repetition="*", escape="$", subcomponent="%")
    assert escape("\x00\t", custom) == "$X00$$X09$"


def test_custom_encoding_escape_round_trip():
    """Non-default delimiters (and a v2.7 truncation character) are escaped and unescaped with their own
    sequences."""
    enc = Encoding(field="!", component="@", repetition="*", escape="$", subcomponent="%", truncation="#")
    text = "x!y@z*w$v%u#t\\|"
    wire = escape(text, enc)
    assert wire == "x$F$y$S$z$R$w$E$v$T$u$P$t\\|"
    assert unescape(wire, enc) == text


@settings(max_examples=300, deadline=None)
@given(st.text() | st.text(alphabet="|^~\\&\r\nXFSTREP.br0Dx\x0b\x1c\x00\x7f张"))
def test_escape_unescape_round_trip(text):
    """For arbitrary text, unescape(escape(text)) == text and the escaped form contains no delimiter and no
    control character (CR, LF, the MLLP block bytes, NUL ...; so it can sit in any field)."""
    wire = escape(text)
    assert unescape(wire) == text
    assert not any(c in wire for c in "|^~&") and not any(ord(c) < 0x20 or c == "\x7f" for c in wire)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20), min_size=1,
                max_size=5))
def test_written_fields_read_back(values):
    """A segment written with escape()+format_message() and parsed back yields the same field values."""
    segs = [
        ["MSH", "^~\\&", "A", "B", "C", "D", "20240301", "", "ADT^A01", "X1", "P", "2.5"],
        ["ZXX"] + [escape(v) for v in values],
    ]
    m = parse(format_message(segs).encode())
    assert [m.segment("ZXX").get(i + 1) for i in range(len(values))] == values


# ---------------------------------------------------------------------------------- separators


def test_cr_lf_and_crlf_separators_give_same_segments():
    """CR, LF and CRLF segment separators all parse to the same segments and values."""
    results = []
    for sep in ("\r", "\n", "\r\n"):
        m = parse(siu(sep=sep).encode())
        results.append([(s.name, s.raw(3)) for s in m.segments])
    assert results[0] == results[1] == results[2]
    assert len(results[0]) == 7


def test_lf_inside_nte_stays_in_field_when_message_uses_cr():
    """When the message uses CR, a bare LF inside NTE text is data, not a segment break."""
    msg = "MSH|^~\\&|A|B|C|D|20240301||ADT^A01|X1|P|2.5\rNTE|1||first line\nsecond line\rPID|1\r"
    m = parse(msg.encode())
    assert [s.name for s in m.segments] == ["MSH", "NTE", "PID"]
    assert m.segment("NTE").get(3) == "first line\nsecond line"


def test_empty_trailing_segments_ignored():
    """Trailing separators and blank lines do not produce segments."""
    m = parse((siu() + "\r\r\n\r").encode())
    assert len(m.segments) == 7
    m = parse((siu(sep="\n") + "\n\n").encode())
    assert len(m.segments) == 7


def test_msh2_with_five_characters():
    """A v2.7 MSH-2 of five characters (truncation '#') is accepted: delimiters are read from it and the
    fields after it are numbered correctly."""
    msg = "MSH|^~\\&#|A|B|C|D|20240301||ADT^A01|X1|P|2.7\rPID|1||ID\\P\\1^^^H\r"
    m = parse(msg.encode())
    assert m.encoding.truncation == "#"
    assert m.msh.get(2) == "^~\\&#"
    assert m.msh.get(3) == "A" and m.control_id == "X1" and m.version == "2.7"
    assert m.segment("PID").get(3) == "ID#1"


def test_nonstandard_delimiters():
    """Delimiters are taken from MSH-1/MSH-2, whatever they are."""
    msg = "MSH!@*$%!A!B!C!D!20240301!!ADT@A01!X1!P!2.5\rPID!1!!a@b*c@d$F$e\r"
    m = parse(msg.encode())
    assert m.type_name == "ADT^A01"
    pid = m.segment("PID")
    assert pid.repetitions(3) == 2 and pid.get(3, 2) == "b" and pid.get(3, 2, 1) == "d!e"


# ------------------------------------------------------------------------------------- charsets


def test_gb18030_message_with_msh18():
    """A GB18030 message labelled 'GB 18030-2000' decodes its Chinese names correctly."""
    raw = siu(charset="GB 18030-2000", name="张^伟").encode("gb18030")
    m = parse(raw)
    assert m.charset == "gb18030"
    assert m.segment("PID").get(5, 1) == "张" and m.segment("PID").get(5, 2) == "伟"


def test_gb18030_message_with_empty_msh18_and_default():
    """With MSH-18 empty the configured default charset is used ('gb18030' for a typical Chinese HIS)."""
    raw = siu(charset="", name="张^伟").encode("gb18030")
    m = parse(raw, default_charset="gb18030")
    assert m.charset == "gb18030"
    assert m.segment("PID").get(5) == "张"


def test_gbk_trail_bytes_equal_to_delimiters_do_not_split():
    """GBK characters whose second byte equals '|', '^', '\\' or '~' stay whole: the message is decoded
    before it is split."""
    family, given = "億乛", "乗亊"  # trail bytes 0x7C '|', 0x5E '^' / 0x5C '\\', 0x7E '~'
    assert [c.encode("gb18030")[1:] for c in family + given] == [b"|", b"^", b"\\", b"~"]
    raw = siu(charset="GBK", name=f"{family}^{given}").encode("gb18030")
    pid = parse(raw).segment("PID")
    assert pid.get(5, 1) == family and pid.get(5, 2) == given
    assert pid.get(7) == "19900307"


def test_wrong_charset_is_error_102():
    """GB18030 bytes in a message that claims UTF-8 give Hl7Error 102 on MSH-18, naming the charset."""
    raw = siu(charset="UNICODE UTF-8", name="张^伟").encode("gb18030")
    with pytest.raises(Hl7Error) as info:
        parse(raw)
    err = info.value
    assert (err.code, err.segment, err.field) == (102, "MSH", 18)
    assert "utf-8" in err.text
    assert "MSH-18" in str(err) and "102" in str(err)


def test_unknown_msh18_is_error_103():
    """An MSH-18 value outside table 0211 (as we support it) gives Hl7Error 103 on MSH-18."""
    with pytest.raises(Hl7Error) as info:
        parse(siu(charset="KLINGON").encode())
    assert (info.value.code, info.value.segment, info.value.field) == (103, "MSH", 18)


@pytest.mark.parametrize(
    "msh18, codec",
    [
        ("", "default-codec"),
        ("UNICODE UTF-8", "utf-8"),
        ("GB 18030-2000", "gb18030"),
        ("GB18030", "gb18030"),
        ("GBK", "gb18030"),
        ("GB2312", "gb18030"),
        ("ASCII", "ascii"),
        ("8859/1", "latin-1"),
        ("8859/2", "iso8859-2"),
        ("8859/9", "iso8859-9"),
    ],
)
def test_charset_codec_table(msh18, codec):
    """charset_codec maps HL7 table 0211 names (and the GB spellings seen in the wild) to python codecs."""
    assert charset_codec(msh18, "default-codec") == codec


def test_hl7_charset_name_inverse():
    """hl7_charset_name gives the MSH-18 spelling back for the codecs we write; unknown codecs are a
    ValueError (configuration error)."""
    assert hl7_charset_name("utf-8") == "UNICODE UTF-8"
    assert hl7_charset_name("gb18030") == "GB 18030-2000"
    assert hl7_charset_name("latin-1") == "8859/1"
    assert hl7_charset_name("ascii") == "ASCII"
    assert hl7_charset_name("iso8859-5") == "8859/5"
    for codec in ("utf-8", "gb18030", "ascii", "latin-1", "iso8859-2"):
        assert charset_codec(hl7_charset_name(codec), "x") in (codec, "latin-1")
    with pytest.raises(ValueError):
        hl7_charset_name("utf-16")


# ---------------------------------------------------------------------------------------- errors


def test_missing_control_id_is_101_field_10():
    """An empty MSH-10 gives Hl7Error 101 naming MSH-10."""
    with pytest.raises(Hl7Error) as info:
        parse(b"MSH|^~\\&|A|B|C|D|20240301||ADT^A01||P|2.5\r")
    assert (info.value.code, info.value.segment, info.value.field) == (101, "MSH", 10)


@pytest.mark.parametrize(
    "raw, field",
    [(b"MSH|^~\\&|A|B|C|D|20240301|||X1|P|2.5", 9), (b"MSH|^~\\&|A|B|C|D|20240301||ADT^A01|X1|P", 12)],
)
def test_missing_message_type_or_version_is_101(raw, field):
    """MSH-9 and MSH-12 are required: 101 naming the field."""
    with pytest.raises(Hl7Error) as info:
        parse(raw)
    assert (info.value.code, info.value.field) == (101, field)


@pytest.mark.parametrize("raw", [b"PID|1||X\rMSH|^~\\&|A", b"", b"\x00\x01", b" MSH|^~\\&|A|B"])
def test_not_starting_with_msh_is_100(raw):
    """Data that does not start with MSH gives Hl7Error 100 on segment MSH."""
    with pytest.raises(Hl7Error) as info:
        parse(raw)
    assert (info.value.code, info.value.segment) == (100, "MSH")


def test_bad_segment_name_is_100_with_position():
    """A segment whose name is not 3 upper-case letters/digits gives 100 with its position in the message."""
    with pytest.raises(Hl7Error) as info:
        parse(b"MSH|^~\\&|A|B|C|D|20240301||ADT^A01|X1|P|2.5\rPID|1\rpv1|1\r")
    assert (info.value.code, info.value.sequence) == (100, 3)


@pytest.mark.parametrize("msh2", ["^~\\", "^~\\&#!", "^^\\&"])
def test_bad_msh2_is_102(msh2):
    """MSH-2 must be 4 or 5 distinct characters: otherwise 102 on MSH-2."""
    with pytest.raises(Hl7Error) as info:
        parse(f"MSH|{msh2}|A|B|C|D|20240301||ADT^A01|X1|P|2.5\r".encode())
    assert (info.value.code, info.value.segment, info.value.field) == (102, "MSH", 2)


def test_hl7error_str_is_readable():
    """str(Hl7Error) names the code, its table 0357 meaning, the location and the text."""
    err = Hl7Error(101, "SCH-2 is empty", segment="SCH", sequence=2, field=2)
    assert str(err) == "HL7 101 Required field missing at SCH[2]-2: SCH-2 is empty"
    assert isinstance(err, ValueError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_parse_raises_only_hl7error(data):
    """parse() on arbitrary bytes either returns a Message or raises Hl7Error - never anything else."""
    for raw in (data, b"MSH|^~\\&|" + data):
        try:
            parse(raw)
        except Hl7Error:
            pass


# ---------------------------------------------------------------------------------- date/times


def test_dtm_and_parse_dtm():
    """dtm() writes YYYYMMDDHHMMSS; parse_dtm reads the documented precisions, naive without an offset and
    aware with one; junk is 102."""
    assert dtm(datetime(2024, 3, 1, 8, 5, 9)) == "20240301080509"
    assert parse_dtm("20240301") == datetime(2024, 3, 1)
    assert parse_dtm("202403011030") == datetime(2024, 3, 1, 10, 30)
    assert parse_dtm("20240301103015") == datetime(2024, 3, 1, 10, 30, 15)
    assert parse_dtm("20240301103015.1234") == datetime(2024, 3, 1, 10, 30, 15, 123400)
    aware = parse_dtm("202403011030+0800")
    assert aware.utcoffset() == timedelta(hours=8)
    assert aware == datetime(2024, 3, 1, 2, 30, tzinfo=UTC)
    assert parse_dtm("20240301103015-0530").utcoffset() == -timedelta(hours=5, minutes=30)
    for junk in ("", "2024", "2024030", "20241301", "20240230", "202403011", "abc", "20240301T1030"):
        with pytest.raises(Hl7Error) as info:
            parse_dtm(junk)
        assert info.value.code == 102


# --------------------------------------------------------------------------------------------- ACKs


def test_build_ack_fields():
    """build_ack: MSH sender/receiver swapped, MSH-9 ACK^<trigger>^ACK, MSH-10 our id, MSH-11 P, MSH-12
    their version, MSH-18 echoed, MSA-1/2/3 - checked by parsing the ACK back."""
    msg = parse(siu().encode())
    ack = parse(build_ack(msg, "AA", text="ok", **ack_kwargs()))
    msh = ack.msh
    assert (msh.get(3), msh.get(4), msh.get(5), msh.get(6)) == ("GATEWAYD", "GW1", "HIS", "HOSP")
    assert msh.get(7) == "20240301083005"
    assert msh.raw(9) == "ACK^S12^ACK"
    assert ack.control_id == "ACK0001"
    assert msh.get(11) == "P"
    assert ack.version == "2.5"
    assert msh.get(18) == "UNICODE UTF-8"
    msa = ack.segment("MSA")
    assert (msa.get(1), msa.get(2), msa.get(3)) == ("AA", "MSG00001", "ok")
    assert ack.segment("ERR") is None
    assert read_ack(ack) == ("AA", "MSG00001", "ok")


def test_build_ack_error_segment():
    """With an error the ACK has ERR-2 segment^sequence^field, ERR-3 code^text^HL70357, ERR-4 E, ERR-8 the
    text, and MSA-3 falls back to the error text; our escaping survives a '|' in the text."""
    msg = parse(siu().encode())
    err = Hl7Error(101, "SCH-2 missing | cannot book", segment="SCH", sequence=1, field=2)
    ack = parse(build_ack(msg, "AE", error=err, **ack_kwargs()))
    e = ack.segment("ERR")
    assert e.raw(2) == "SCH^1^2"
    assert (e.get(3, 1), e.get(3, 2), e.get(3, 3)) == ("101", "Required field missing", "HL70357")
    assert e.get(4) == "E"
    assert e.get(8) == "SCH-2 missing | cannot book"
    assert ack.segment("MSA").get(3) == "SCH-2 missing | cannot book"
    assert read_ack(ack) == ("AE", "MSG00001", "SCH-2 missing | cannot book")


def test_build_ack_extra_segments_follow_msa():
    """extra_segments (already escaped) are appended after MSA/ERR, in order."""
    msg = parse(siu().encode())
    raw = build_ack(msg, "AA", extra_segments=[["SCH", "P1", "HA9"], ["NTE", "1", "", escape("x|y")]],
                    **ack_kwargs())
    ack = parse(raw)
    assert [s.name for s in ack.segments] == ["MSH", "MSA", "SCH", "NTE"]
    assert ack.segment("SCH").get(2) == "HA9" and ack.segment("NTE").get(3) == "x|y"


def test_build_ack_keeps_gb18030():
    """A GB18030 message gets a GB18030-encoded ACK labelled 'GB 18030-2000', and Chinese text survives."""
    msg = parse(siu(charset="GB 18030-2000", name="张^伟").encode("gb18030"))
    raw = build_ack(msg, "AE", text="号源已满", **ack_kwargs())
    assert "号源已满".encode("gb18030") in raw
    ack = parse(raw)
    assert ack.charset == "gb18030" and ack.msh.get(18) == "GB 18030-2000"
    assert read_ack(ack)[2] == "号源已满"


def test_build_ack_for_empty_msh18_uses_message_charset_and_no_label():
    """With MSH-18 empty the ACK is encoded in the charset the message was read with (the default) and
    carries no MSH-18 either."""
    msg = parse(siu(charset="", name="张^伟").encode("gb18030"), default_charset="gb18030")
    raw = build_ack(msg, "AE", text="号源已满", **ack_kwargs())
    ack = parse(raw, default_charset="gb18030")
    assert ack.msh.get(18) == "" and read_ack(ack)[2] == "号源已满"


def test_build_ack_without_trigger():
    """A message whose MSH-9 has no trigger event gets MSH-9 'ACK'."""
    msg = parse(b"MSH|^~\\&|A|B|C|D|20240301||QRY|X1|P|2.3\r")
    ack = parse(build_ack(msg, "AA", **ack_kwargs()))
    assert ack.msh.raw(9) == "ACK" and ack.version == "2.3"


def test_read_ack_without_msa_is_101():
    """read_ack raises Hl7Error 101 (segment MSA) for a message without MSA; text falls back to ERR-8."""
    with pytest.raises(Hl7Error) as info:
        read_ack(parse(siu().encode()))
    assert (info.value.code, info.value.segment) == (101, "MSA")
    ack = parse(b"MSH|^~\\&|A|B|C|D|20240301||ACK|X1|P|2.5\rMSA|AR|C9\rERR||||E||||why not\r")
    assert read_ack(ack) == ("AR", "C9", "why not")


def test_nak_for_unparseable_salvages_header():
    """The NAK for a message that failed parsing is AR, echoes the salvaged MSH-10 in MSA-2, swaps the
    salvaged MSH-3/4 into MSH-5/6, keeps MSH-12/18, and describes the error in ERR."""
    raw = siu(charset="UNICODE UTF-8", name="张^伟").encode("gb18030")  # wrong charset -> 102
    with pytest.raises(Hl7Error) as info:
        parse(raw)
    nak = parse(build_nak_for_unparseable(raw, info.value, **ack_kwargs()))
    assert read_ack(nak)[:2] == ("AR", "MSG00001")
    assert (nak.msh.get(5), nak.msh.get(6)) == ("HIS", "HOSP")
    assert nak.msh.raw(9) == "ACK^S12^ACK" and nak.version == "2.5" and nak.msh.get(18) == "UNICODE UTF-8"
    err = nak.segment("ERR")
    assert err.raw(2) == "MSH^1^18" and err.get(3) == "102" and "utf-8" in err.get(8)
    assert salvage_control_id(raw) == "MSG00001"


def test_nak_for_garbage():
    """Garbage that is not even an MSH still gets a well-formed AR NAK with an empty MSA-2."""
    err = Hl7Error(100, "message does not start with an MSH segment", segment="MSH")
    nak = parse(build_nak_for_unparseable(b"\x00garbage\xff", err, **ack_kwargs()))
    assert read_ack(nak) == ("AR", "", err.text)
    assert nak.segment("ERR").get(3) == "100"
    assert salvage_control_id(b"\x00garbage") == ""


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.sampled_from([b"", b"MSH|^~\\&|", b"MSH|^~\\&|A|B|C|D|E||ACK^A01|"]))
def test_nak_for_arbitrary_bytes_never_raises(data, prefix):
    """build_nak_for_unparseable never raises, whatever the bytes, and its output is itself a parseable AR
    ACK (in the default charset or the one salvaged from MSH-18)."""
    raw = prefix + data
    err = Hl7Error(100, "bad", segment="MSH")
    nak = build_nak_for_unparseable(raw, err, **ack_kwargs())
    assert isinstance(nak, bytes)
    frame(nak)  # never contains the MLLP block bytes
    parsed = parse(nak)
    assert read_ack(parsed)[0] == "AR"
