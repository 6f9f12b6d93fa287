"""gatewayd's MLLP sender delivers to MLLP servers other people wrote, used unmodified: hl7apy's
``hl7apy.mllp.MLLPServer`` and python-hl7's asyncio ``hl7.mllp`` server. The messages are the gateway's
real outbound SRM^S01/S04 (built by adapters.maps.srm_booking) with Chinese names, an address-like
family name full of HL7 delimiters, in UTF-8 and GB18030. Each peer must receive them byte for byte, and we
must read each peer's own ACK (MSA-2 matched).

Our side runs as a process (tests/interop/mllp_tool.py: MLLPClient on the real reactor); the peers run in
threads of the test process.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from adapters.hl7.er7 import parse
from adapters.maps.srm_booking import Hl7Header, build_srm
from gateway.domain.model import Patient, PatientIdentifier, SlotForHis
from tests.interop.peers import Hl7apyPeer, PythonHl7Peer

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2030, 11, 24, 7, 30)


def run_tool(*args: str, timeout: float = 30) -> tuple[int, list[dict], str]:
    """Run tests/interop/mllp_tool.py; (exit code, one dict per JSON line on stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, "-m", "tests.interop.mllp_tool", *args], cwd=REPO, env=env,
                         capture_output=True, timeout=timeout)
    lines = [json.loads(line) for line in run.stdout.decode().splitlines() if line.strip()]
    return run.returncode, lines, run.stderr.decode(errors="replace")


def srm_messages(tmp_path: Path, charset: str) -> list[tuple[Path, bytes]]:
    """Two SRM^S01 and one SRM^S04 as the gateway sends them to a HIS using ``charset``."""
    header = Hl7Header("GATEWAYD", "前置机", "HIS", "人民医院", version="2.5", charset=charset)
    slot = SlotForHis("D001", datetime(2030, 11, 24, 8, 0), 15, "cardio", "心内科门诊", "D001")
    patients = [
        Patient((PatientIdentifier("urn:oid:1.2.156.112604.1.2.1", "110101199003071234", "RRI"),),
                family="欧阳", given="娜娜", phone="13800138000"),
        Patient((PatientIdentifier("urn:demo:mrn", "MR|0002^A~B&C", "MR"),),  # delimiters in an id
                family="张|王^李~赵&钱\\孙", given="三\n四", phone="010-6528 8888"),
    ]
    out = []
    for i, (trigger, patient) in enumerate([("S01", patients[0]), ("S01", patients[1]), ("S04", patients[0])]):
        body = build_srm(trigger, header=header, control_id=f"G{charset[:2].upper()}{i:017d}",
                         appointment_id=f"A{i}", slot=slot, patient=patient, now=NOW,
                         his_appointment="HA-1" if trigger == "S04" else None)
        path = tmp_path / f"{charset}-{i}.hl7"
        path.write_bytes(body)
        out.append((path, body))
    return out


def check_delivered(results: list[dict], messages: list[tuple[Path, bytes]], peer_app: str, charset: str) -> None:
    assert [r["ok"] for r in results] == [True] * len(messages), results
    for r, (_path, body) in zip(results, messages):
        control_id = parse(body).control_id
        assert (r["code"], r["answered"]) == ("AA", control_id)
        ack = parse(base64.b64decode(r["raw"]), default_charset=charset)
        assert ack.sending_application == peer_app  # their ACK, read by us


@pytest.mark.parametrize("charset", ["utf-8", "gb18030"])
def test_delivery_to_hl7apy_mllp_server(tmp_path, charset):
    """Our SRMs reach hl7apy's MLLPServer intact (the text it decoded equals what we encoded, and hl7apy's
    own parser reads MSH-10), and we take hl7apy's ACKs. hl7apy closes the connection after each message:
    the sender writes the next one again on a new connection by itself, so every send succeeds at the first
    attempt as the relay sees it, and hl7apy sees each message once."""
    messages = srm_messages(tmp_path, charset)
    with Hl7apyPeer(["SRM^S01^SRM_S01", "SRM^S04^SRM_S01"], encoding=charset) as peer:
        code, results, stderr = run_tool("send", "--port", str(peer.port), *[str(p) for p, _ in messages])
    assert code == 0, stderr
    check_delivered(results, messages, "HL7APY", charset)
    assert peer.received == [body.decode(charset) for _, body in messages]
    assert peer.parsed_control_ids == [parse(body).control_id for _, body in messages]
    assert [r["attempts"] for r in results] == [1, 1, 1]


@pytest.mark.parametrize("charset", ["utf-8", "gb18030"])
def test_delivery_to_python_hl7_asyncio_server(tmp_path, charset):
    """Our SRMs reach python-hl7's asyncio MLLP server byte for byte on one connection, python-hl7 parses
    them (MSH-10 as sent, the Chinese family name as we wrote it), and we take its ACKs."""
    messages = srm_messages(tmp_path, charset)
    with PythonHl7Peer(encoding=charset) as peer:
        # python-hl7's create_ack leaves MSH-18 empty: its ACKs are read with the HIS's configured charset
        code, results, stderr = run_tool("send", "--port", str(peer.port), "--charset", charset,
                                         *[str(p) for p, _ in messages])
    assert code == 0, stderr
    check_delivered(results, messages, "PYHL7", charset)
    assert peer.received == [body for _, body in messages]
    assert peer.parsed_control_ids == [parse(body).control_id for _, body in messages]
    assert [r["attempts"] for r in results] == [1, 1, 1]  # one connection, nothing resent
    import hl7

    first = hl7.parse(peer.received[0].decode(charset))
    assert str(first.segment("PID")[5]) == "欧阳^娜娜"
