"""The fuzz harnesses, their seeds, and one run of one harness in a process of its own.

atheris is libFuzzer for Python: it owns the process it runs in and stops at the first crash, so every run is
a child process (``python -m tests.fuzz.fuzz_<target> <libFuzzer flags> <corpus dirs>``). A run gets two
corpus directories: a writable one first, where libFuzzer keeps the new inputs it finds (a temporary
directory in the test suite, ``bench/results/fuzz/<target>/corpus`` in a campaign: never git), then the
target's seeds (``corpus/<target>/``, only read). A crash — an exception the harness does not allow or an
invariant that does not hold — a hang (``timeout`` seconds on one input) or an input that takes more than
``rss_limit_mb`` ends the run and leaves the input in ``artifacts`` (``crash-<sha1>``, ``timeout-<sha1>``,
``oom-<sha1>``); `report` shows it with the harness's traceback. (libFuzzer also leaves ``slow-unit-<sha1>``
for an input over 10 s that did not reach ``timeout``: on a loaded host that is not a finding.)

Used by tests/fuzz/test_fuzz_short.py and bench/fuzz.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

#: target name -> what its harness (tests/fuzz/fuzz_<name>.py) fuzzes; the invariants are in each docstring
TARGETS = {
    "framer": "the MLLP framer (adapters/inner/framing.py), the stream fed in random chunkings",
    "er7": "the ER7 reader (adapters/hl7/er7.py) with each default charset, and the ACK/NAK builders for what "
           "it reads (adapters/hl7/ack.py)",
    "fhir": "the FHIR JSON intake (JsonLimits.parse, adapters/outer/intake.py) and the Appointment -> booking "
            "mapping (adapters/maps/fhir_scheduling.py)",
    "config": "the config loader (gateway/config/): a YAML file -> GatewayConfig or "
              "ConfigError",
    "siu": "the SIU^S12..S26 / SQR^S25 -> slot notice map (adapters/maps/siu_slot.py)",
    "srm": "the SRM^S01/S03/S04 writer (adapters/maps/srm_booking.py) with fuzzed domain values",
    "pharmacy": "what the HIS pharmacy sends: RDS^O13 dispensing, a released RDE^O11 (adapters/maps/rds_dispense.py) "
                "and the answers to the gateway's orders (adapters/maps/rde_order.py)",
    "token": "the token endpoint's client assertion (a signed JWT) and requested scope (adapters/outer/oauth.py)",
}


def main(check: Callable[[bytes], None]) -> None:
    """A harness's ``__main__``: run ``check`` on libFuzzer's inputs, with this process's arguments."""
    import atheris

    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


#: the default charsets an HL7 harness picks from with its input's first byte (the HIS charsets the gateway reads)
HL7_CHARSETS = ("utf-8", "gb18030", "latin-1", "ascii")


def hl7_input(data: bytes):
    """An HL7 harness's input read as a message: byte 0 picks the default charset (HL7_CHARSETS), the rest is
    one message. None for an empty input or one `parse` refuses (the er7 harness's business)."""
    from adapters.hl7.er7 import Hl7Error, parse  # (imported here: the harness imported it instrumented first)

    if not data:
        return None
    try:
        return parse(data[1:], default_charset=HL7_CHARSETS[data[0] % len(HL7_CHARSETS)])
    except Hl7Error:
        return None


@dataclass
class Run:
    target: str
    returncode: int
    output: str  # libFuzzer's and the harness's output (stderr and stdout together)
    artifacts: list[Path]  # crash/timeout/oom inputs this run left

    @property
    def executions(self) -> int:
        """Inputs tried (libFuzzer's final stats), 0 when it did not say."""
        found = re.findall(r"stat::number_of_executed_units:\s*(\d+)", self.output)
        return int(found[-1]) if found else 0

    @property
    def failed(self) -> bool:
        return self.returncode != 0 or bool(self.artifacts)


def run(target: str, *, corpus: Path, artifacts: Path, runs: int | None = None, seconds: int | None = None,
        seed: int | None = None, timeout: int = 10, rss_limit_mb: int = 1024) -> Run:
    """Run one harness until ``runs`` inputs were tried (seeds included) or ``seconds`` passed, or it fails.
    ``seed`` fixes libFuzzer's random seed and Python's hash seed and turns off what depends on time, so a run
    of ``runs`` inputs can be repeated exactly."""
    if target not in TARGETS:
        raise ValueError(f"unknown fuzz target {target!r} (one of {', '.join(TARGETS)})")
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    before = set(artifacts.iterdir())
    cmd = [sys.executable, "-m", f"tests.fuzz.fuzz_{target}", f"-artifact_prefix={artifacts}/",
           f"-timeout={timeout}", f"-rss_limit_mb={rss_limit_mb}", "-print_final_stats=1"]
    dictionary = HERE / "dicts" / f"{target}.dict"
    if dictionary.exists():
        cmd.append(f"-dict={dictionary}")
    if runs is not None:
        cmd.append(f"-runs={runs}")
    if seconds is not None:
        cmd.append(f"-max_total_time={seconds}")
    scratch = artifacts.parent / "tmp"  # a harness's temporary files (the config target's directory)
    scratch.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(scratch))
    if seed is not None:  # and nothing that depends on time: libFuzzer's entropic schedule weighs inputs by it
        cmd += [f"-seed={seed}", "-entropic=0", "-reload=0"]
        env["PYTHONHASHSEED"] = "0"
    cmd += [str(corpus), str(CORPUS / target)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    left = sorted(p for p in set(artifacts.iterdir()) - before if not p.name.startswith("slow-unit-"))
    return Run(target, proc.returncode, proc.stdout.decode("utf-8", "replace"), left)


def report(result: Run, *, show_bytes: int = 2000) -> str:
    """What a failed run found: each input it left (path and bytes) and the harness's traceback."""
    lines = [f"fuzz target {result.target}: exit {result.returncode}"]
    for path in result.artifacts:
        data = path.read_bytes()
        shown = repr(data[:show_bytes]) + (f" ... ({len(data)} bytes)" if len(data) > show_bytes else "")
        lines += [f"input: {path}", f"  {shown}"]
    out = result.output
    start = out.find("=== Uncaught Python exception")
    if start < 0:
        start = max(out.find("==ERROR"), out.find("ALARM"))
    lines.append(out[start:start + 6000] if start >= 0 else out[-3000:])
    return "\n".join(lines)
