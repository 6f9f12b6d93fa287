"""The release files the install tests use: those of ``make dist`` named by GATEWAYD_DIST_DIR (.ci/dist sets
it), or built here into a temporary directory with the same command."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def make_dist(out: Path, *args: str) -> None:
    work = out / "work"
    subprocess.run(["make", "-C", str(REPO), "dist", f"DIST_ARGS=--out {out} --work {work} {' '.join(args)}"],
                   check=True, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> Path:
    """The directory with gatewayd_V_amd64.deb, gatewayd-V-offline.tar.gz, ... and (work/wheels) its wheelhouse."""
    given = os.environ.get("GATEWAYD_DIST_DIR")
    if given:
        return Path(given).resolve()
    if os.geteuid() != 0 or not shutil.which("dpkg-deb"):
        pytest.skip("building the release needs root and dpkg-deb")
    out = tmp_path_factory.mktemp("dist")
    make_dist(out)
    return out


def one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"{directory}: expected one {pattern}, found {[p.name for p in found]}"
    return found[0]
