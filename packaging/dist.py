"""``make dist``: gatewayd's release files, from the files git tracks, into ``dist/``.

    python packaging/dist.py [--version V] [--out dist] [--work build/dist] [--only sdist,deb,offline]

1. ``gatewayd-V.tar.gz`` and ``gatewayd-V-py3-none-any.whl`` (with LICENSE, docs/ and deploy/ in the sdist);
2. the wheelhouse: every wheel gatewayd needs on linux x86_64 and aarch64, CPython 3.11 and 3.12
   (``pip download --only-binary=:all:``, manylinux 2.17 so that glibc 2.17 or newer will do);
3. ``gatewayd_V_amd64.deb``: the runtime of packaging/runtime.py under /opt/gatewayd, the launcher, the units,
   /etc/gatewayd, the maintainer scripts of packaging/deb/;
4. ``gatewayd-V-offline.tar.gz``: the wheelhouse with install.sh (packaging/offline/), the units, the example
   configs and the docs;
5. ``SHA256SUMS`` of everything in dist/.

``--version`` builds another version from the same tree (setup.cfg's version is replaced in the staged copy):
the install test builds the "next release" that way. The build writes ``gateway/BUILD`` into the staged copy
(version and commit) for ``gatewayd --version``.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# (pip platform tags, python version) of the wheelhouse: manylinux2014 = glibc 2.17 (CentOS 7, openEuler 20.03+).
PLATFORMS = {
    "x86_64": ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64",
               "manylinux_2_5_x86_64", "manylinux1_x86_64"],
    "aarch64": ["manylinux_2_17_aarch64", "manylinux2014_aarch64"],
}
PYTHONS = ["3.11", "3.12"]


def run(*cmd: str | Path, cwd: Path | None = None, env: dict | None = None) -> str:
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, check=True, stdout=subprocess.PIPE,
                          text=True).stdout


def commit_of(repo: Path) -> str:
    try:
        head = run("git", "-C", repo, "rev-parse", "--short=12", "HEAD").strip()
        dirty = run("git", "-C", repo, "status", "--porcelain", "--untracked-files=no").strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def stage(work: Path, version: str | None) -> tuple[Path, str, str]:
    """Copy the files git tracks (as they are in the work tree) to work/src; returns it, version, commit."""
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    files = run("git", "-C", REPO, "ls-files", "-z").split("\0")
    for name in filter(None, files):
        path = REPO / name
        if path.is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    cfg = src / "setup.cfg"
    text = cfg.read_text(encoding="utf-8")
    parser = configparser.ConfigParser()
    parser.read_string(text)
    current = parser["metadata"]["version"]
    if version and version != current:
        text = text.replace(f"version = {current}\n", f"version = {version}\n", 1)
        cfg.write_text(text, encoding="utf-8")
    version = version or current
    commit = commit_of(REPO)
    (src / "gateway" / "BUILD").write_text(f"{version} {commit}\n", encoding="utf-8")
    return src, version, commit


def python_packages(src: Path, out: Path, py: str) -> tuple[Path, Path]:
    run(py, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(out)!r})", cwd=src)
    run(py, "-c", f"from setuptools import build_meta as b; b.build_wheel({str(out)!r})", cwd=src)
    name = "gatewayd-" + run(py, "-c", "import configparser; c = configparser.ConfigParser(); "
                                        "c.read('setup.cfg'); print(c['metadata']['version'])", cwd=src).strip()
    return out / f"{name}.tar.gz", out / f"{name}-py3-none-any.whl"


#: the optional dependencies every release carries: the drivers of HIS endpoints of kind database and webservice
#: (docs/his-adapters.md), so that an air-gapped site whose HIS is a database or a web service needs nothing more
EXTRAS = "postgresql,mysql,webservice"


def wheelhouse(wheel: Path, dest: Path, py: str) -> None:
    """Every wheel ``wheel`` needs, for each platform and Python of the matrix, into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, dest)
    for arch, tags in PLATFORMS.items():
        for version in PYTHONS:
            platform_args = [a for tag in tags for a in ("--platform", tag)]
            try:
                run(py, "-m", "pip", "download", "--quiet", "--dest", dest, "--only-binary=:all:",
                    "--implementation", "cp", "--python-version", version, *platform_args,
                    f"{wheel}[{EXTRAS}]")
            except subprocess.CalledProcessError:
                raise SystemExit(
                    f"dist: some dependency has no wheel for {arch} / Python {version} (manylinux 2.17): see "
                    f"pip's message above. A pure-Python one can be built here with 'pip wheel --no-deps NAME "
                    f"-w {dest}'; one with C code needs a wheel built on that platform (docs/install.md).")


def sh_script(name: str, common: str, version: str) -> str:
    text = (HERE / "deb" / name).read_text(encoding="utf-8")
    return text.replace("#COMMON#", common).replace("#VERSION#", version)


def cli_docs(src: Path, root: Path, py: str) -> list[Path]:
    """The man page gatewayd(8) and the bash completion, generated from the staged source's CLI parser
    (gateway/ops/clidoc.py), where the .deb installs them under ``root``."""
    generated = {("man",): root / "usr" / "share" / "man" / "man8" / "gatewayd.8.gz",
                 ("completion", "bash"): root / "usr" / "share" / "bash-completion" / "completions" / "gatewayd"}
    for command, target in generated.items():
        text = run(py, "-m", "gateway", *command, cwd=src, env={**os.environ, "PYTHONPATH": str(src)})
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix == ".gz":  # (reproducible: no name, no time in the header)
            with open(target, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
                gz.write(text.encode("utf-8"))
        else:
            target.write_text(text, encoding="utf-8")
    return list(generated.values())


def deb(src: Path, work: Path, out: Path, wheels: Path, version: str, commit: str, py: str) -> Path:
    root = work / "deb"
    if root.exists():
        shutil.rmtree(root)
    opt = root / "opt" / "gatewayd"
    runtime = json.loads(run(py, HERE / "runtime.py", opt / "runtime", wheels).strip().splitlines()[-1])
    (opt / "bin").mkdir(parents=True)
    shutil.copy2(HERE / "deb" / "launcher", opt / "bin" / "gatewayd")
    (opt / "bin" / "gatewayd").chmod(0o755)
    (root / "usr" / "bin").mkdir(parents=True)
    os.symlink("../../opt/gatewayd/bin/gatewayd", root / "usr" / "bin" / "gatewayd")
    units = root / "lib" / "systemd" / "system"
    units.mkdir(parents=True)
    for unit in sorted([*(src / "deploy" / "systemd").glob("*.service"), *(src / "deploy" / "systemd").glob("*.timer")]):
        shutil.copy2(unit, units / unit.name)
    cli_docs(src, root, py)
    tmpfiles = root / "usr" / "lib" / "tmpfiles.d"
    tmpfiles.mkdir(parents=True)
    shutil.copy2(src / "deploy" / "systemd" / "gatewayd.tmpfiles", tmpfiles / "gatewayd.conf")
    etc = root / "etc" / "gatewayd"
    etc.mkdir(parents=True)
    config = (src / "config" / "gateway.example.yaml").read_text(encoding="utf-8")
    if "\n  path: chamber.sqlite3 " not in config:
        raise SystemExit("dist: config/gateway.example.yaml no longer has 'path: chamber.sqlite3' under chamber")
    config = config.replace("\n  path: chamber.sqlite3 ", "\n  path: /var/lib/gatewayd/chamber.sqlite3 ", 1)
    (etc / "gateway.yaml").write_text(config, encoding="utf-8")
    doc = root / "usr" / "share" / "doc" / "gatewayd"
    shutil.copytree(src / "docs", doc / "docs")
    shutil.copy2(src / "README.md", doc / "README.md")
    shutil.copy2(src / "LICENSE", doc / "copyright")
    shutil.copytree(src / "config", doc / "examples")
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    control = root / "DEBIAN"
    control.mkdir()
    size_kib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()) // 1024
    text = (HERE / "deb" / "control.in").read_text(encoding="utf-8")
    for key, value in {"VERSION": version, "SIZE": str(size_kib), "GLIBC": runtime["glibc"],
                       "PYTHON": runtime["python"], "COMMIT": commit}.items():
        text = text.replace(f"#{key}#", value)
    (control / "control").write_text(text, encoding="utf-8")
    (control / "conffiles").write_text("/etc/gatewayd/gateway.yaml\n", encoding="utf-8")
    common = (HERE / "deb" / "common.sh").read_text(encoding="utf-8")
    for name in ("preinst", "postinst", "prerm", "postrm"):
        (control / name).write_text(sh_script(name, common, version), encoding="utf-8")
        (control / name).chmod(0o755)
    target = out / f"gatewayd_{version}_amd64.deb"
    run("dpkg-deb", "--root-owner-group", "-Zgzip", "--build", root, target)
    return target


def offline(src: Path, work: Path, out: Path, wheels: Path, version: str) -> Path:
    name = f"gatewayd-{version}-offline"
    top = work / name
    if top.exists():
        shutil.rmtree(top)
    top.mkdir(parents=True)
    shutil.copytree(wheels, top / "wheels")
    shutil.copy2(HERE / "offline" / "install.sh", top / "install.sh")
    (top / "install.sh").chmod(0o755)
    (top / "VERSION").write_text(version + "\n", encoding="utf-8")
    shutil.copytree(src / "deploy", top / "deploy")
    shutil.copytree(src / "config", top / "config")
    shutil.copytree(src / "docs", top / "docs")
    shutil.copy2(src / "README.md", top)
    shutil.copy2(src / "LICENSE", top)
    target = out / f"{name}.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        tar.add(top, arcname=name)
    return target


def checksums(out: Path) -> Path:
    lines = []
    for path in sorted(out.iterdir()):
        if path.is_file() and path.name != "SHA256SUMS":
            lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    (out / "SHA256SUMS").write_text("".join(lines), encoding="utf-8")
    return out / "SHA256SUMS"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--version", help="build this version instead of setup.cfg's")
    p.add_argument("--out", type=Path, default=REPO / "dist")
    p.add_argument("--work", type=Path, default=REPO / "build" / "dist")
    p.add_argument("--only", default="sdist,deb,offline", help="comma-separated: sdist, deb, offline")
    p.add_argument("--wheels", type=Path, help="reuse this wheelhouse (a former build's) instead of downloading; "
                                               "its gatewayd wheel is replaced by this build's")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    py = sys.executable
    work, out = args.work.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    src, version, commit = stage(work, args.version)
    sdist, wheel = python_packages(src, out, py)
    if only == {"sdist"}:
        checksums(out)
        return 0
    wheels = work / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    if args.wheels:
        shutil.copytree(args.wheels, wheels, ignore=lambda _d, names: [n for n in names if n.startswith("gatewayd-")])
        shutil.copy2(wheel, wheels)
    else:
        wheelhouse(wheel, wheels, py)
    if "deb" in only:
        print(deb(src, work, out, wheels, version, commit, py))
    if "offline" in only:
        print(offline(src, work, out, wheels, version))
    print(checksums(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
