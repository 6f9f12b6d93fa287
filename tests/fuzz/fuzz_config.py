"""Fuzz harness: the config loader (`load_config`: gateway/config/model.py on gateway/config/schema.py), from the file's
bytes to a GatewayConfig.

Input, read two ways (each gives a file that is loaded):

* as the bytes of a gateway.yaml (syntax, YAML's surprises, keys, sections);
* as new values for one of the seed configs that load (``corpus/config/*.yaml``): byte 0 picks the config,
  the rest is cut at 0x1E into changes, each one byte picking a value (a scalar, in the order the config's
  values come) and its new text, read as YAML (so ``15``, ``~``, ``[a]`` or ``Asia`` stay what YAML makes
  of them). The changed config is written back with ``yaml.safe_dump``: values get deep into the checks
  that bytes flipped at random seldom reach. (The ``values-*`` seeds set every value to its own text.)

The file is written into a directory that holds a development CA's certificates under ``certs/`` (as the
e2e tests' configs name them), so that a config can get past the file checks into the cross-field ones.

Invariants (anything else is a crash; the operator would get a traceback instead of a message):

* `load_config` returns a GatewayConfig or raises ConfigError; nothing else.
* A ConfigError has at least one issue, and every issue names the file given, a line of it and a column
  (line 1..lines + 1 as YAML counts lines, column >= 1), and a message; its key is '' (the file) or a key
  path (``name``, ``.name``, ``[i]``, ``['odd name']`` parts); the issues are in file order and the error's
  text lists each of them.
"""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["gateway.config", "yaml"]):
    import yaml

    from gateway.config.errors import ConfigError
    from gateway.config.model import GatewayConfig, load_config

from gateway.ops.devca import init_dev_ca
from tests.fuzz.campaign import CORPUS, main

WORKDIR = Path(tempfile.mkdtemp(prefix="gatewayd-fuzz-config-"))
init_dev_ca(WORKDIR / "certs", platforms=("demo", "other"))
CONFIG = WORKDIR / "gateway.yaml"
_NAME, _INDEX = r"[A-Za-z0-9_-]+", r"\[(?:\d+|'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]"
KEY_PATH = re.compile(rf"(?:{_NAME}|{_INDEX})(?:\.{_NAME}|{_INDEX})*")  # a, a.b, a[0], a['odd key']
LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # YAML's line breaks: its line numbers count them


def _loads(path: Path) -> bool:
    CONFIG.write_bytes(path.read_bytes())
    try:
        load_config(CONFIG)
    except ConfigError:
        return False
    return True


BASES = [yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted((CORPUS / "config").glob("*.yaml"))
         if _loads(p)]


def scalars(node, path=()) -> list[tuple]:
    """Paths to every scalar value of a loaded config, in document order."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in scalars(v, (*path, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in scalars(v, (*path, i))]
    return [path]


PATHS = [scalars(base) for base in BASES]


def changed(data: bytes) -> bytes:
    """``data`` read as changes to the values of a seed config (see the module docstring)."""
    which = data[0] % len(BASES)
    config, paths = copy.deepcopy(BASES[which]), PATHS[which]
    for change in data[1:].split(b"\x1e"):
        if not change:
            continue
        *parents, last = paths[change[0] % len(paths)]
        text = change[1:].decode("utf-8", "replace")
        try:
            value = yaml.safe_load(text)
        except Exception:  # noqa: BLE001 - not YAML (or too deep for the harness's own reader): the text itself
            value = text
        node = config
        for step in parents:
            node = node[step]
        node[last] = value
    return yaml.safe_dump(config, allow_unicode=True).encode("utf-8")


def load(data: bytes) -> None:
    CONFIG.write_bytes(data)
    try:
        config = load_config(CONFIG)
    except ConfigError as e:
        assert e.issues, "a ConfigError without issues"
        lines = len(LINE_BREAK.split(data.decode("utf-8", "replace")))
        text = str(e)
        for issue in e.issues:
            assert issue.file == str(CONFIG), issue
            assert 1 <= issue.line <= lines + 1 and issue.column >= 1, (issue, lines)
            assert issue.message, issue
            assert issue.key == "" or KEY_PATH.fullmatch(issue.key), issue.key
            assert str(issue) in text, issue
        assert e.issues == sorted(e.issues, key=lambda i: (i.line, i.column)), e.issues
        return
    assert isinstance(config, GatewayConfig), type(config)


def check(data: bytes) -> None:
    load(data)
    if data:
        load(changed(data))


if __name__ == "__main__":
    main(check)
