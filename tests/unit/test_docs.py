"""The docs stay true: the README's configuration reference is what `gatewayd config-reference` prints,
and its first lines are the two commands CI and people run."""

from pathlib import Path

from gateway.cli import config_reference

REPO = Path(__file__).resolve().parents[2]


def test_readme_config_reference_matches_the_code():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- config-reference:start")
    start = readme.index("\n", start) + 1
    end = readme.index("<!-- config-reference:end -->")
    assert readme[start:end].strip() == config_reference().strip(), \
        "README's configuration reference is stale: run `gatewayd config-reference --update README.md`"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    commands = lines[lines.index("```sh") + 1: lines.index("```sh") + 3]
    assert commands == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text().splitlines()
