"""A running gatewayd (real processes: tests/e2e/harness.Lock) against peers and traffic it did not choose:

* python-hl7's ``mllp_send`` command delivers files of SIU messages and gets AA for each;
* ../shared/tools/mllp_load.py (enhanced mode, MSH-15=AL MSH-16=NE) gets exactly one CA per message;
* a GB18030 SIU labelled 'GB 18030-2000' with escape sequences is read right and answered in GB18030;
* a 50 MB garbage stream on one connection leaves another connection served and the process's memory flat.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adapters.hl7.ack import read_ack
from adapters.hl7.er7 import parse
from adapters.inner.framing import MLLPFramer, frame
from tests.e2e.harness import REPO, Lock, eventually

SHARED_LOAD = REPO.parent / "shared" / "tools" / "mllp_load.py"


def mllp_send_command() -> list[str]:
    """python-hl7's ``mllp_send`` console script as installed with this interpreter (a virtualenv's bin/ need
    not be on PATH), else from PATH."""
    beside = Path(sys.executable).parent / "mllp_send"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mllp_send")
    assert found, "python-hl7's mllp_send is not installed (pip install '.[test]')"
    return [found]


@pytest.fixture(scope="module")
def lock(tmp_path_factory):
    with Lock(tmp_path_factory.mktemp("interop"), doctors=1, days=1) as running:
        yield running


def siu_s24(control_id: str, schedule: str, name: tuple[str, str], start: str, *, msh15: str = "",
            msh16: str = "", msh18: str = "UNICODE UTF-8", facility: str = "HOSPITAL",
            department: str = "心内科", service: str = "心内科门诊") -> str:
    """An SIU^S24 (slot opened) in the profile's shape (docs/hl7-profile.md), as text."""
    family, given = name
    return (
        f"MSH|^~\\&|HIS|{facility}|GATEWAYD|FRONT|20301124070000||SIU^S24^SIU_S12|{control_id}|P|2.5"
        f"|||{msh15}|{msh16}|CHN|{msh18}\r"
        f"SCH|||||{schedule}^{family}{given}门诊|S24^opened|||15|MIN|^^15^{start}^{start[:10]}15"
        "|||||||||||||Open\r"
        "RGS|1\r"
        f"AIS|1||cardio^{service}|{start}|||15|MIN\r"
        f"AIL|1||CARD^^^^^^^^{department}\r"
        f"AIP|1||{schedule}^{family}^{given}\r"
    )


def exchange(port: int, payload: bytes, answers: int = 1, timeout: float = 10) -> list[bytes]:
    """Send one frame on a new connection and read ``answers`` frames back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(frame(payload))
        framer, frames = MLLPFramer(), []
        while len(frames) < answers:
            data = s.recv(65536)
            assert data, "the gateway closed the connection"
            frames += framer.feed(data)
        return frames


# ====================================================================================== python-hl7


def test_mllp_send_delivers_a_file_of_siu_messages(lock, tmp_path):
    """python-hl7's ``mllp_send`` (unmodified, as installed) sends a file of MLLP-framed SIU^S24 - one
    plain, two with Chinese names - and gets an AA for each, MSA-2 matching; the slots and the Chinese
    names are then in the gateway's FHIR API."""
    messages = [
        siu_s24("MS-1", "IOP1", ("Li", "Na"), "203011240800"),
        siu_s24("MS-2", "IOP2", ("欧阳", "娜娜"), "203011240815", department="呼吸内科"),
        siu_s24("MS-3", "IOP3", ("司马", "相如"), "203011240830", service="中医科·针灸"),
    ]
    path = tmp_path / "siu.mllp"
    path.write_bytes(b"".join(frame(m.encode()) for m in messages))
    run = subprocess.run([*mllp_send_command(), "--file", str(path), "--port", str(lock.mllp_port), "127.0.0.1"],
                         capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    acks = [parse(p) for p in MLLPFramer().feed(run.stdout)]
    assert [read_ack(a)[:2] for a in acks] == [("AA", "MS-1"), ("AA", "MS-2"), ("AA", "MS-3")]
    s = lock.session()
    assert s.get(f"{lock.base}/Slot/IOP2-203011240815").json()["status"] == "free"
    schedule = s.get(f"{lock.base}/Schedule/IOP2").json()
    assert {a["display"] for a in schedule["actor"]} == {"欧阳娜娜", "呼吸内科"}
    assert s.get(f"{lock.base}/Slot/IOP3-203011240830").json()["serviceType"][0]["text"] == "中医科·针灸"


def test_mllp_send_loose_text_file(lock, tmp_path):
    """The same tool with ``--loose``: a text file with LF line ends and blank lines between messages (as
    people keep them) is delivered and acknowledged."""
    messages = [siu_s24(f"ML-{i}", f"IOL{i}", ("张", f"医生{i}"), f"2030112409{i}0") for i in range(1, 4)]
    path = tmp_path / "siu.txt"
    path.write_text("\n\n".join(m.replace("\r", "\n") for m in messages), encoding="utf-8")
    run = subprocess.run([*mllp_send_command(), "--loose", "--file", str(path), "--port", str(lock.mllp_port),
                          "127.0.0.1"], capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    acks = [parse(p) for p in MLLPFramer().feed(run.stdout)]
    assert [read_ack(a)[:2] for a in acks] == [("AA", f"ML-{i}") for i in range(1, 4)]
    assert lock.session().get(f"{lock.base}/Schedule/IOL2").json()["actor"][0]["display"] == "张医生2"


# ================================================================================== enhanced mode


@pytest.mark.skipif(not SHARED_LOAD.exists(), reason="../shared/tools/mllp_load.py not present")
def test_mllp_load_gets_exactly_one_ca_per_message(lock):
    """mllp_load sends MSH-15=AL, MSH-16=NE and reads exactly one frame per message: every answer it counts
    is a CA (an extra application ACK would be read as the next message's answer and show up as AA)."""
    run = subprocess.run([sys.executable, str(SHARED_LOAD), "--port", str(lock.mllp_port), "-n", "50",
                          "--conns", "2"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["acks"] == {"CA": 100}
    # and nothing else was waiting behind the last CA on a connection
    with socket.create_connection(("127.0.0.1", lock.mllp_port), timeout=5) as s:
        msg = siu_s24("EN-1", "IOE1", ("王", "芳"), "203011241000", msh15="AL", msh16="NE").encode()
        s.sendall(frame(msg))
        time.sleep(0.3)
        frames = MLLPFramer().feed(s.recv(65536))
    assert [read_ack(parse(f))[:2] for f in frames] == [("CA", "EN-1")]


def test_enhanced_sender_asking_for_application_ack_gets_ca_then_aa(lock):
    msg = siu_s24("EN-2", "IOE2", ("王", "芳"), "203011241015", msh15="AL", msh16="AL").encode()
    answers = [parse(f) for f in exchange(lock.mllp_port, msg, answers=2)]
    assert [read_ack(a)[:2] for a in answers] == [("CA", "EN-2"), ("AA", "EN-2")]
    assert [(a.accept_ack_type, a.application_ack_type) for a in answers] == [("NE", "NE")] * 2


# ===================================================================================== charsets


def test_gb18030_siu_labelled_in_msh18_is_read_and_answered_in_gb18030(lock):
    """A GB18030 SIU whose MSH-18 says 'GB 18030-2000' reaches a gateway whose default charset is UTF-8:
    names, department and a service text with escape sequences (\\F\\ \\T\\) are read right, and the AA
    comes back in GB18030 (the facility copied from MSH-4 is GB18030 bytes, not UTF-8)."""
    text = siu_s24("GB-1", "IOG1", ("欧阳", "娜娜"), "203011241100", msh18="GB 18030-2000",
                   facility="人民医院", department="呼吸内科", service="呼吸内科\\F\\专家\\T\\特需门诊")
    [raw] = exchange(lock.mllp_port, text.encode("gb18030"))
    assert "人民医院".encode("gb18030") in raw and "人民医院".encode("utf-8") not in raw
    ack = parse(raw)
    assert ack.charset == "gb18030" and ack.msh.get(18) == "GB 18030-2000"
    assert read_ack(ack)[:2] == ("AA", "GB-1") and ack.receiving_facility == "人民医院"
    s = lock.session()
    assert {a["display"] for a in s.get(f"{lock.base}/Schedule/IOG1").json()["actor"]} == {"欧阳娜娜", "呼吸内科"}
    slot = s.get(f"{lock.base}/Slot/IOG1-203011241100").json()
    assert slot["serviceType"][0]["text"] == "呼吸内科|专家&特需门诊"


# ================================================================================ garbage, memory


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def garbage(total: int, chunk: int = 1 << 20) -> list[bytes]:
    """``total`` random bytes in ``chunk`` pieces, each one frame of garbage (random bytes without 0x0B and
    0x1C, framed), answered with a NAK. (Random bytes between frames would be junk, and a connection is
    closed after inner.max_junk_bytes of it: tests/unit/test_mllp_edge.py.)"""
    table = bytes(range(256)).replace(b"\x0b", b"\x00").replace(b"\x1c", b"\x00")
    return [frame(os.urandom(chunk - 3).translate(table)) for _ in range(total // chunk)]


def test_50_mb_of_garbage_leaves_other_connections_served_and_memory_flat(lock):
    """While 50 MB of random bytes flow into one connection (its NAKs drained by a reader), an SIU on a
    second connection gets its AA, and the gateway's resident memory grows by less than 50 MB. Figures
    are printed for the record."""
    pid = lock.gateway.popen.pid
    pieces = garbage(50 << 20)
    before = rss_kib(pid)
    peak = [before]
    stop = threading.Event()
    sent_10mb = threading.Event()
    naks = []

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.005)

    def drain(sock):
        framer = MLLPFramer(4 << 20)
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            naks.extend(framer.feed(data))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", lock.mllp_port), timeout=30) as g:
        garbage_port = g.getsockname()[1]
        reader = threading.Thread(target=drain, args=(g,), daemon=True)
        reader.start()

        answered = threading.Event()
        sent = [0]

        def flood():
            # at least the 50 MB, and on until the SIU is answered (so it is answered while garbage flows)
            for i in range(200):
                if i >= len(pieces) and answered.is_set():
                    return
                g.sendall(pieces[i % len(pieces)])
                sent[0] += len(pieces[0])
                if i == 10:
                    sent_10mb.set()

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        assert sent_10mb.wait(20)
        t0 = time.monotonic()
        msg = siu_s24("GA-1", "IOX1", ("Li", "Na"), "203011241200").encode()
        [ack] = exchange(lock.mllp_port, msg)
        siu_ms = (time.monotonic() - t0) * 1000
        answered.set()
        flooder.join(60)
        assert not flooder.is_alive()
        flood_s = time.monotonic() - started
        g.shutdown(socket.SHUT_WR)
        reader.join(10)
    stop.set()
    sampler.join(2)
    assert read_ack(parse(ack))[:2] == ("AA", "GA-1")
    assert siu_ms < 2000, f"the SIU waited {siu_ms:.0f} ms behind the garbage"
    assert naks and all(read_ack(parse(n))[0] == "AR" for n in naks)
    growth_mb = (peak[0] - before) / 1024
    print(f"\n{sent[0] >> 20} MB garbage in {flood_s:.2f} s; SIU answered in {siu_ms:.1f} ms during it; "
          f"{len(naks)} NAKs; "
          f"gateway RSS {before / 1024:.1f} MB -> peak {peak[0] / 1024:.1f} MB (+{growth_mb:.1f} MB)")
    assert growth_mb < 50

    def closed():
        for line in lock.gateway.log_path.read_text(encoding="utf-8").splitlines():
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "mllp.connection.closed" and event.get("peer") == f"127.0.0.1:{garbage_port}":
                return event
        return None

    event = eventually(closed, timeout=10, what="the garbage connection's close event")
    assert event["unanswered"] == 0  # every garbage frame was answered
    [after] = exchange(lock.mllp_port, siu_s24("GA-2", "IOX2", ("Li", "Na"), "203011241215").encode())
    assert read_ack(parse(after))[:2] == ("AA", "GA-2")
    assert lock.gateway.alive()
