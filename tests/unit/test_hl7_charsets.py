"""Charsets and escape sequences on real-world-shaped messages (a pharmacy order and a scheduling
notification from a Chinese HIS), in UTF-8 and GB18030.

What "byte-exact" means here, and where the standard requires it:
* the chamber keeps the message as received (`Message.raw` is the input bytes);
* an answer copies MSH-3/MSH-4 and MSH-10 into MSH-5/MSH-6 and MSA-2 byte for byte (the sender compares
  MSA-2 with what it sent; an escaped or multi-byte control id must come back unchanged);
* writing the values we read back with `escape` + `format_message` gives the input bytes again when the input
  used the standard's escapes for delimiters (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\) and \\X0D\\ for CR. Other escapes are
  value-exact, not byte-exact: \\.br\\ becomes a line feed (written back as \\X0A\\), \\Xhh..\\ becomes the
  character those bytes are in the message's charset (written back as the character itself).
"""

from __future__ import annotations

from datetime import datetime

import hl7
import pytest

from adapters.hl7.ack import build_ack, build_nak_for_unparseable, read_ack
from adapters.hl7.er7 import Hl7Error, escape, format_message, parse, unescape

NOW = datetime(2030, 11, 24, 9, 0)

# An RDE^O11 as a Chinese HIS sends it to a pharmacy: patient, address, diagnosis, the drug and its
# instructions. Canonical escapes only, so it must be reproduced byte for byte.
RDE = [
    ("MSH|^~\\&|HIS|人民医院\\T\\门诊部|PHARM|药房|20301124090000||RDE^O11^RDE_O11|RX\\F\\2030\\S\\0001|P|2.5"
     "|||AL|NE|CHN|{msh18}"),
    ("PID|1||110101199003071234^^^CHN^RRI~MR0001^^^HOSP^MR||欧阳^娜娜||19900307|F|||"
     "北京市朝阳区建国路88号^3单元\\T\\502室^北京^北京^100022^CHN||010-65288888"),
    "PV1|1|O|呼吸内科^^^^^^^^呼吸内科门诊",
    "ORC|NW|RX0001^HIS||||||||||D001^李^娜",
    "DG1|1||J06.900^急性上呼吸道感染^ICD10",
    ("RXE|^^^20301124^^R|86900001000011^阿莫西林胶囊 0.25g\\S\\24粒/盒^国家药品编码|0.5||g^克|胶囊|"
     "饭后服用\\F\\每日三次\\E\\注意过敏史|||2|盒"),
    "RXR|PO^口服",
    "NTE|1||皮试阴性\\R\\青霉素类\\X0D\\药师：王芳",
]
# an SIU^S12 with the same kinds of text
SIU = [
    "MSH|^~\\&|HIS|人民医院|GATEWAYD|FRONT|20301124090000||SIU^S12^SIU_S12|S-0001|P|2.5|||||CHN|{msh18}",
    "SCH||HA-1^HIS||||S12^预约|||15|MIN|^^15^203011240800^203011240815|||||||||||||Booked",
    "PID|1||MR0002^^^HOSP^MR||司马^相如||||||上海市浦东新区世纪大道100号\\S\\环球金融中心",
    "RGS|1",
    "AIS|1||tcm^中医科\\F\\针灸推拿|203011240800|||15|MIN",
    "AIL|1||TCM^^^^^^^^中医科",
    "AIP|1||D002^諸葛^孔明",
]

CHARSETS = [("utf-8", "UNICODE UTF-8"), ("gb18030", "GB 18030-2000")]


def wire(segments: list[str], msh18: str, codec: str) -> bytes:
    return "".join(s.format(msh18=msh18) + "\r" for s in segments).encode(codec)


def rebuild(message) -> bytes:
    """Write every field of ``message`` back from its unescaped values (components, repetitions,
    subcomponents) with `escape` and `format_message`."""
    enc = message.encoding
    segments = []
    for seg in message.segments:
        fields = [seg.name]
        start = 2 if seg.name == "MSH" else 1
        if seg.name == "MSH":
            fields.append(seg.raw(2))
        for n in range(start + (1 if seg.name == "MSH" else 0), seg.field_count + 1):
            reps = []
            for r in range(max(seg.repetitions(n), 1)):
                comps = []
                raw_comps = seg.raw(n).split(enc.repetition)[r].split(enc.component) if seg.raw(n) else [""]
                for c, raw_comp in enumerate(raw_comps, start=1):
                    subs = [escape(seg.get(n, c, r, s), enc) for s in range(1, raw_comp.count(enc.subcomponent) + 2)]
                    comps.append(enc.subcomponent.join(subs))
                reps.append(enc.component.join(comps))
            fields.append(enc.repetition.join(reps))
        segments.append(fields)
    return format_message(segments, enc).encode(message.charset)


@pytest.mark.parametrize("codec,msh18", CHARSETS)
@pytest.mark.parametrize("segments", [RDE, SIU], ids=["RDE^O11", "SIU^S12"])
def test_round_trip_is_byte_exact(segments, codec, msh18):
    """Read a message, write every value back: the same bytes (canonical escapes), and the chamber's copy
    (`raw`) is the input untouched."""
    data = wire(segments, msh18, codec)
    message = parse(data)
    assert message.charset == codec and message.raw == data
    assert rebuild(message) == data


@pytest.mark.parametrize("codec,msh18", CHARSETS)
def test_values_of_a_pharmacy_order(codec, msh18):
    """The values come out unescaped and in Chinese, whatever the charset: names, an address whose
    second line holds '&', a drug whose name holds '^', instructions holding '|' and '\\', a note holding
    '~' and a CR."""
    m = parse(wire(RDE, msh18, codec))
    pid, rxe, nte = m.segment("PID"), m.segment("RXE"), m.segment("NTE")
    assert (pid.get(5, 1), pid.get(5, 2)) == ("欧阳", "娜娜")
    assert pid.get(11, 1) == "北京市朝阳区建国路88号" and pid.get(11, 2) == "3单元&502室"
    assert pid.get(11, 5) == "100022" and pid.get(3, 1, 1) == "MR0001"
    assert rxe.get(2, 2) == "阿莫西林胶囊 0.25g^24粒/盒" and rxe.get(2, 3) == "国家药品编码"
    assert rxe.get(6) == "胶囊" and rxe.get(7) == "饭后服用|每日三次\\注意过敏史"
    assert nte.get(3) == "皮试阴性~青霉素类\r药师：王芳"
    assert m.segment("DG1").get(3, 2) == "急性上呼吸道感染"
    assert m.control_id == "RX|2030^0001" and m.msh.raw(10) == "RX\\F\\2030\\S\\0001"
    assert m.sending_facility == "人民医院&门诊部"


@pytest.mark.parametrize("codec,msh18", CHARSETS)
def test_ack_echoes_header_and_control_id_byte_for_byte(codec, msh18):
    """The answer copies MSH-3/4 (to MSH-5/6) and MSH-10 (to MSA-2) exactly as the sender wrote them,
    escapes and Chinese included, in the sender's charset; MSH-18 is echoed; our own text is escaped."""
    data = wire(RDE, msh18, codec)
    message = parse(data)
    raw = build_ack(message, "AE", sending_application="GATEWAYD", sending_facility="前置机",
                    control_id="A1", now=NOW, text="库存不足|请改药")
    assert "|HIS|人民医院\\T\\门诊部|".encode(codec) in raw
    assert "MSA|AE|RX\\F\\2030\\S\\0001|库存不足\\F\\请改药\r".encode(codec) in raw
    assert f"|{msh18}\r".encode(codec) in raw
    ack = parse(raw)
    assert read_ack(ack) == ("AE", "RX|2030^0001", "库存不足|请改药")
    assert ack.receiving_facility == "人民医院&门诊部" and ack.sending_facility == "前置机"
    assert raw.endswith(b"\r") and raw.count(b"\r") == 2  # every segment ends with CR, none is empty


def test_gbk_trail_bytes_that_equal_delimiters_do_not_split_fields():
    """In GBK/GB18030 the second byte of a character may be 0x7C '|', 0x5C '\\', 0x5E '^' or 0x7E '~'
    (億 is 83 7C, 乗 is 81 5C, 乛 is 81 5E, 亊 is 81 7E). The message is decoded before it is split, so
    these characters stay whole, in a name, an escaped value and the echo in the ACK."""
    assert [c.encode("gb18030")[1:] for c in "億乗乛亊"] == [b"|", b"\\", b"^", b"~"]
    text = ("MSH|^~\\&|HIS|億乗醫院|GW|F|20301124||SIU^S12^SIU_S12|G-億|P|2.5|||||CHN|GB 18030-2000\r"
            "PID|1||X^^^H^MR||億乛^乗亊\\F\\億||||||億乗路1号\r")
    data = text.encode("gb18030")
    assert data.count(b"|") > text.count("|")  # the raw bytes hold more 0x7C than the text has fields
    m = parse(data)
    pid = m.segment("PID")
    assert (pid.get(5, 1), pid.get(5, 2)) == ("億乛", "乗亊|億") and pid.get(11) == "億乗路1号"
    assert m.control_id == "G-億" and m.sending_facility == "億乗醫院"
    ack = build_ack(m, "AA", sending_application="GW", sending_facility="F", control_id="A", now=NOW)
    assert "MSA|AA|G-億\r".encode("gb18030") in ack and read_ack(parse(ack))[1] == "G-億"
    # the same with MSH-18 empty and GB18030 configured as the HIS's default
    empty = text.replace("GB 18030-2000", "").encode("gb18030")
    assert parse(empty, default_charset="gb18030").segment("PID").get(5, 2) == "乗亊|億"


def test_a_header_whose_msh18_reads_differently_in_gb18030_is_refused_not_misread():
    """Found by the fuzz campaign (tests/fuzz/fuzz_er7.py). 億 (83 7C) in MSH-4 shifts the byte-by-byte
    reading of the MSH by one field: read byte by byte MSH-18 is empty (so the configured GB18030 applies),
    read as GB18030 it says UNICODE UTF-8. The message was decoded as GB18030 while saying UTF-8, and its
    ACK echoed MSH-18 UTF-8 around GB18030 bytes, an answer the HIS (and our own reader) cannot read. A
    header that names another charset once decoded is refused with 102 on MSH-18."""
    data = "MSH|^~\\&|HIS|億|GW|FR|20301124||SIU^S12^SIU_S12|C1|P|2.5||||||UNICODE UTF-8\rRGS|1\r".encode("gb18030")
    assert data.decode("latin-1").split("|")[17] == ""  # byte by byte, MSH-18 is empty
    with pytest.raises(Hl7Error) as info:
        parse(data, default_charset="gb18030")
    assert (info.value.code, info.value.location) == (102, "MSH-18")
    nak = build_nak_for_unparseable(data, info.value, sending_application="GW", sending_facility="F",
                                    control_id="N1", now=NOW, default_charset="gb18030")
    assert read_ack(parse(nak, default_charset="gb18030"))[0] == "AR"


@pytest.mark.parametrize("facility", ["院", "一院二", "人民医院"])
def test_a_utf8_message_that_says_so_is_utf8_whatever_the_default(facility):
    """Found by the fuzz campaign (tests/fuzz/fuzz_er7.py, in a NAK our own reader could not read back). A
    HIS endpoint configured with default GB18030 sends UTF-8 and says so in MSH-18. Read as GB18030, the
    UTF-8 bytes of 院 (E9 99 A2) take the '|' after them into a character (A2 7C), so that reading finds
    MSH-18 empty, and it won because the default is GB: the message was refused as 'not valid gb18030'.
    The GB reading now wins on an empty MSH-18 only when the byte-by-byte one names no charset."""
    data = (f"MSH|^~\\&|HIS|{facility}|GW|F|20301124||SIU^S12^SIU_S12|C1|P|2.5||||||UNICODE UTF-8\r"
            "PID|1||X^^^H^MR||王^芳\r").encode("utf-8")
    m = parse(data, default_charset="gb18030")
    assert (m.charset, m.sending_facility, m.segment("PID").get(5, 2)) == ("utf-8", facility, "芳")


@pytest.mark.parametrize("raw, field", [(b"MSH|\x83^~\\&|", 2), (b"MSH\xa7^~\\&\xa7", 1)])
def test_delimiters_that_are_not_ascii_are_refused(raw, field):
    """Found by the fuzz campaign (tests/fuzz/fuzz_er7.py): MSH-2 '\\x83^~\\&' read byte by byte is five
    delimiters (0x83 the component separator), but in GB18030 0x83 0x5E is one character, so the message was
    split with delimiters its decoded text does not have, and the ACK wrote 0x83 as four GB18030 bytes: an
    MSH-2 of 8 characters that no reader takes. Delimiters are one byte in every charset only when they are
    ASCII: others are 102."""
    data = raw + b"HIS|H|GW|F|20301124||SIU^S12^SIU_S12|C1|P|2.5\rRGS|1\r".replace(b"|", raw[3:4])
    for codec in ("gb18030", "utf-8", "latin-1"):
        with pytest.raises(Hl7Error) as info:
            parse(data, default_charset=codec)
        assert (info.value.code, info.value.location) == (102, f"MSH-{field}")


@pytest.mark.parametrize("codec", ["utf-8", "gb18030"])
def test_hex_escapes_are_bytes_in_the_message_charset(codec):
    """\\Xhh..\\ is the bytes hh.. in the message's charset: \\XB0A2\\ is 阿 in GB18030, \\XE998BF\\ is 阿 in
    UTF-8; \\X0D\\ is CR in both; hex that does not decode in the charset is kept as it is."""
    hexed = "阿".encode(codec).hex().upper()
    text = (f"MSH|^~\\&|A|B|C|D|2030||RDE^O11|X1|P|2.5|||||CHN|{dict(CHARSETS)[codec]}\r"
            f"NTE|1||\\X{hexed}\\莫西林\\X0D\\胶囊|\\XFF\\\r")
    nte = parse(text.encode(codec)).segment("NTE")
    assert nte.get(3) == "阿莫西林\r胶囊"
    assert nte.get(4) == "\\XFF\\"


@pytest.mark.parametrize("value,wire_form", [
    ("C:\\temp\\", "C:\\E\\temp\\E\\"),            # escape character at the end of a field
    ("|^&~\\", "\\F\\\\S\\\\T\\\\R\\\\E\\"),          # consecutive escapes
    ("第一行\r第二行\n第三行", "第一行\\X0D\\第二行\\X0A\\第三行"),
    ("\x0b\x1c", "\\X0B\\\\X1C\\"),                  # MLLP block bytes can never break the framing
    ("阿莫西林胶囊", "阿莫西林胶囊"),
])
def test_escape_forms(value, wire_form):
    """escape() writes the standard's escapes (and hex for CR, LF and the MLLP block bytes); unescape()
    reads them back; an independent reader (python-hl7) agrees on the delimiter escapes."""
    assert escape(value) == wire_form
    assert unescape(wire_form) == value
    if "\r" not in value and "\n" not in value and "\x0b" not in value:
        assert hl7.parse("MSH|^~\\&|A|B|C|D|2030||ADT^A01|1|P|2.5").unescape(wire_form) == value


def test_line_break_escape_is_value_exact_not_byte_exact():
    """\\.br\\ (a formatting command) reads as a line feed; written back it becomes \\X0A\\ - the same value,
    other bytes. (An HIS that compares our copy byte for byte never sees this: answers copy raw fields.)"""
    m = parse("MSH|^~\\&|A|B|C|D|2030||ADT^A01|1|P|2.5\rNTE|1||过敏史\\.br\\青霉素\r".encode())
    assert m.segment("NTE").get(3) == "过敏史\n青霉素"
    assert escape(m.segment("NTE").get(3)) == "过敏史\\X0A\\青霉素"


def test_truncation_character_of_v2_7():
    """MSH-2 with five characters (v2.7 truncation '#'): '#' in data is escaped as \\P\\ and read back."""
    m = parse("MSH|^~\\&#|A|B|C|D|2030||ADT^A01|1|P|2.7\rNTE|1||编号\\P\\12#3\r".encode())
    assert m.encoding.truncation == "#"
    assert m.segment("NTE").get(3) == "编号#12#3"
    assert escape("编号#1", m.encoding) == "编号\\P\\1"


def test_format_message_ends_every_segment_with_cr():
    """HL7 v2.5 section 2.5.1: every segment, the last included, ends with the segment terminator CR."""
    assert format_message([["MSH", "^~\\&", "A"], ["MSA", "AA", "1"]]) == "MSH|^~\\&|A\rMSA|AA|1\r"
    assert format_message([]) == ""
