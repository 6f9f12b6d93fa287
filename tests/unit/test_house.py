"""The house's rules hold (docs/architecture.md): the import contracts in .importlinter — the two gates never
import each other; the domain, the chamber and the relay import no adapter; the domain no process plumbing
(gateway.ops, the wiring, the CLI); the chamber no domain rule; the maps and the HL7 codec neither Twisted nor
the chamber — checked by import-linter over the tree, and a forbidden import added to a copy of the tree
breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(tree)))


def test_the_import_contracts_hold():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "5 kept, 0 broken" in result.stdout, result.stdout[-2000:]


def test_a_back_edge_breaks_them(tmp_path):
    """The outer gate importing the inner gate's client, in a copy of the tree: lint-imports fails and names it."""
    for part in ("gateway", "adapters", "hissim", ".importlinter"):
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / part)
    site = tmp_path / "adapters" / "outer" / "site.py"
    site.write_text(site.read_text(encoding="utf-8") + "\nimport adapters.inner.client  # a back-edge\n",
                    encoding="utf-8")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "The two gates never import each other BROKEN" in result.stdout, result.stdout[-2000:]
    assert "adapters.outer.site -> adapters.inner.client" in result.stdout, result.stdout[-2000:]
