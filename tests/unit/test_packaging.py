"""The release's quick parts (issue 19): what the sdist and wheel carry (LICENSE, docs, deploy, the chamber's
schema files as package data, without setuptools' "would be ignored" warning), ``gatewayd --version``,
``gatewayd config-reference | head`` without a BrokenPipeError, the maintainer scripts and install.sh parse,
and the runtime builder's split between glibc (the host's) and the libraries it bundles.
The builds and installs themselves are tests/dist (marker ``dist``, run by .ci/dist)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def script_module(name: str):
    """packaging/NAME.py (packaging/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"packaging_{name}", REPO / "packaging" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dist = script_module("dist")
runtime = script_module("runtime")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist and wheel built from the files git tracks (packaging/dist.py's staging), and what the build
    printed."""
    work = tmp_path_factory.mktemp("build")
    src, version, _commit = dist.stage(work, None)
    out = work / "out"
    out.mkdir()
    log = []
    for kind in ("sdist", "wheel"):
        done = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_{kind}({str(out)!r})"],
                              cwd=src, capture_output=True, text=True, check=True)
        log.append(done.stdout + done.stderr)
    return {"src": src, "sdist": out / f"gatewayd-{version}.tar.gz", "wheel": out / f"gatewayd-{version}-py3-none-any.whl",
            "log": "\n".join(log), "version": version}


def test_the_sdist_carries_the_license_docs_deploy_and_packaging(built):
    with tarfile.open(built["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for name in ("LICENSE", "README.md", "docs/install.md", "docs/architecture.md", "deploy/systemd/gatewayd.service",
                 "deploy/systemd/gatewayd.tmpfiles", "deploy/prometheus/gatewayd.rules.yml",
                 "deploy/prometheus/gatewayd.rules.test.yml", "deploy/grafana/gatewayd.json",
                 "config/gateway.example.yaml", "packaging/dist.py",
                 "packaging/deb/postinst", "packaging/offline/install.sh", "gateway/chamber/schema/chamber-v1.sql",
                 "gateway/BUILD"):
        assert name in names, name
    assert not any("__pycache__" in n for n in names)


def test_the_wheel_has_the_schema_files_the_license_docs_deploy_and_the_build_commit(built):
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = set(whl.namelist())
        build = whl.read("gateway/BUILD").decode()
    schema = sorted(p.name for p in (REPO / "gateway" / "chamber" / "schema").glob("*.sql"))
    assert schema and all(f"gateway/chamber/schema/{n}" in names for n in schema)
    assert "hissim/schema/his-sim-v1.sql" in names
    assert f"gatewayd-{built['version']}.dist-info/LICENSE" in names
    data = f"gatewayd-{built['version']}.data/data/share"
    for name in ("doc/gatewayd/LICENSE", "doc/gatewayd/install.md", "doc/gatewayd/architecture.md",
                 "gatewayd/deploy/systemd/gatewayd.service", "gatewayd/deploy/systemd/gatewayd-inner.service",
                 "gatewayd/deploy/systemd/gatewayd-backup.service", "gatewayd/deploy/systemd/gatewayd-backup.timer",
                 "gatewayd/deploy/systemd/gatewayd.tmpfiles", "gatewayd/deploy/prometheus/gatewayd.rules.yml",
                 "gatewayd/deploy/prometheus/gatewayd.rules.test.yml", "gatewayd/deploy/grafana/gatewayd.json",
                 "gatewayd/config/gateway.example.yaml"):
        assert f"{data}/{name}" in names, name
    assert re.fullmatch(rf"{re.escape(built['version'])} ([0-9a-f]{{12}}(-dirty)?|unknown)\n", build)
    assert "would be ignored" not in built["log"] and "as data is deprecated" not in built["log"], built["log"]


def test_license_is_the_apache_2_0_text():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text


def test_version_names_the_version_and_the_commit():
    done = subprocess.run([sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0
    assert re.fullmatch(r"gatewayd \S+ \(commit (unknown: not built by make dist|[0-9a-f]{12}(-dirty)?)\)\n",
                        done.stdout), done.stdout


def test_a_reader_that_goes_away_ends_the_output_without_a_traceback():
    """`gatewayd config-reference | head`: the pipe's reader is gone before the first write."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "gateway", "config-reference"], stdout=write,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=60)
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == 141  # as a command killed by SIGPIPE: the shell's 128 + 13


@pytest.mark.parametrize("name", ["preinst", "postinst", "prerm", "postrm"])
def test_the_maintainer_scripts_parse(name):
    common = (REPO / "packaging" / "deb" / "common.sh").read_text()
    script = dist.sh_script(name, common, "9.9.9")
    assert "#COMMON#" not in script and "#VERSION#" not in script
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    if shutil.which("shellcheck"):
        # warnings and errors; SC2034: common.sh's variables are not used by every script
        checked = subprocess.run(["shellcheck", "-s", "sh", "-S", "warning", "-e", "SC2034", "-"], input=script,
                                 text=True)
        assert checked.returncode == 0


def test_install_sh_and_the_launcher_parse():
    for path in (REPO / "packaging" / "offline" / "install.sh", REPO / "packaging" / "deb" / "launcher"):
        assert subprocess.run(["sh", "-n", str(path)]).returncode == 0, path


def test_the_deb_gets_the_man_page_and_completion_of_the_staged_release(built, tmp_path):
    """What the .deb installs as gatewayd(8) and the bash completion: generated from the staged source (no
    installed gatewayd), naming the release's version in the page's header."""
    import gzip

    man, completion = dist.cli_docs(built["src"], tmp_path, sys.executable)
    assert man == tmp_path / "usr/share/man/man8/gatewayd.8.gz"
    page = gzip.decompress(man.read_bytes()).decode()
    assert page.startswith(".TH GATEWAYD 8 ") and f'"gatewayd {built["version"]} (commit ' in page.splitlines()[0]
    assert ".SS restore" in page and ".SS reload" in page
    assert man.read_bytes()[4:8] == bytes(4)  # no time in the gzip header: the same build, the same bytes
    assert completion == tmp_path / "usr/share/bash-completion/completions/gatewayd"
    assert completion.read_text().rstrip().endswith("complete -o filenames -F _gatewayd gatewayd")


def test_the_units_run_the_path_both_installs_provide():
    """The .deb puts its launcher at /opt/gatewayd/bin/gatewayd; install.sh links its venv's there."""
    assert "/opt/gatewayd/bin/gatewayd" in (REPO / "packaging" / "offline" / "install.sh").read_text()
    for unit in (REPO / "deploy" / "systemd").glob("*.service"):
        # (a shell that execs it is allowed: the nightly backup names its copy by the weekday)
        execs = re.findall(r"(?m)^ExecStart(?:Pre)?=(?:/bin/sh -c 'exec )?(\S+)", unit.read_text())
        assert execs and set(execs) == {"/opt/gatewayd/bin/gatewayd"}, (unit.name, execs)


@pytest.mark.parametrize("soname,host", [("libc.so.6", True), ("libm.so.6", True), ("libpthread.so.0", True),
                                         ("ld-linux-x86-64.so.2", True), ("linux-vdso.so.1", True),
                                         ("libssl.so.3", False), ("libsqlite3.so.0", False), ("libffi.so.8", False),
                                         ("libcrypt.so.1", False), ("libz.so.1", False)])
def test_the_runtime_bundles_everything_but_glibc(soname, host):
    assert bool(runtime.GLIBC.match(soname)) is host


def test_the_stdlib_copy_leaves_out_tests_and_tk(tmp_path):
    src = tmp_path / "stdlib"
    for name in ("os.py", "test/test_os.py", "distutils/tests/test_core.py", "tkinter/__init__.py", "lib-dynload/_ssl.so",
                 "lib-dynload/_tkinter.so", "lib-dynload/_testcapi.so", "config-3.11-x86_64-linux-gnu/Makefile",
                 "site-packages/x.py", "json/__init__.py"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("")
    runtime.copy_stdlib(src, tmp_path / "copy")
    copied = {str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*") if p.is_file()}
    assert copied == {"os.py", "json/__init__.py", "lib-dynload/_ssl.so"}


def test_the_installed_packages_test_suites_are_removed_and_nothing_else(tmp_path):
    site = tmp_path / "site-packages"
    files = ("twisted/__init__.py", "twisted/test/__init__.py", "twisted/test/iosim.py",
             "twisted/web/__init__.py", "twisted/web/test/test_http.py", "twisted/web/test/data/x.txt",
             "zope/interface/__init__.py", "zope/interface/tests/__init__.py",
             "pkg/__init__.py", "pkg/testing.py", "pkg/tests.py", "pkg/data/tests/keep.json",
             "tests/__init__.py")  # a top-level "tests" (not inside a package) is some distribution's own: kept
    for name in files:
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text("")
    removed = runtime.prune_tests(site)
    assert {str(p.relative_to(site)) for p in removed} == {"twisted/test", "twisted/web/test", "zope/interface/tests"}
    left = {str(p.relative_to(site)) for p in site.rglob("*") if p.is_file()}
    assert left == {"twisted/__init__.py", "twisted/web/__init__.py", "zope/interface/__init__.py", "pkg/__init__.py",
                    "pkg/testing.py", "pkg/tests.py", "pkg/data/tests/keep.json", "tests/__init__.py"}
