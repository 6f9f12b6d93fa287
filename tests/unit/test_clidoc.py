"""Shell completion and the man page come from the CLI's own parser (gateway/ops/clidoc.py): every command and
option is in them, bash completes what the parser accepts, and the page is valid roff."""

import shutil
import subprocess

import pytest

from gateway.cli import _parser, main
from gateway.ops.clidoc import bash_completion, commands, man_page


def _complete(script: str, words: list[str], tmp_path) -> list[str]:
    """What bash offers after ``words`` (the last one is the word being completed)."""
    (tmp_path / "gatewayd.bash").write_text(script)
    array = " ".join(f"'{w}'" for w in words)
    test = (f"source {tmp_path / 'gatewayd.bash'}; COMP_WORDS=({array}); COMP_CWORD={len(words) - 1}; "
            f"_gatewayd; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    done = subprocess.run(["bash", "-c", test], capture_output=True, text=True, cwd=tmp_path, check=True)
    return [line for line in done.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completes_commands_options_choices_and_files(tmp_path):
    script = bash_completion(_parser())
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    assert _complete(script, ["gatewayd", "re"], tmp_path) == ["restore", "reload"]
    assert _complete(script, ["gatewayd", "queue", "l"], tmp_path) == ["list"]
    assert set(_complete(script, ["gatewayd", "queue", "list", "--"], tmp_path)) == {
        "--help", "--state", "--dest", "--direction", "--limit", "--config", "--notifications"}
    assert sorted(_complete(script, ["gatewayd", "queue", "list", "--state", "de"], tmp_path)) == ["dead", "delivered"]
    assert _complete(script, ["gatewayd", "run", "--gate", ""], tmp_path) == ["both", "inner", "outer"]
    (tmp_path / "gateway.yaml").write_text("")
    assert _complete(script, ["gatewayd", "restore", "--config", "gateway."], tmp_path) == ["gateway.yaml"]
    assert sorted(_complete(script, ["gatewayd", "restore", "gatewa"], tmp_path)) == ["gateway.yaml", "gatewayd.bash"]
    assert _complete(script, ["gatewayd", "queue", "list", "--limit", ""], tmp_path) == []  # a number: nothing


def test_completion_and_man_name_every_command_and_option():
    parser = _parser()
    script, page = bash_completion(parser), man_page(parser, "gatewayd 1.0 (commit x)")
    leaves = [(path, sub) for path, sub, _ in commands(parser)
              if path and not any(a.__class__.__name__ == "_SubParsersAction" for a in sub._actions)]
    assert len(leaves) >= 20 and ("restore",) in [p for p, _ in leaves] and ("queue", "purge") in [p for p, _ in leaves]
    for path, sub in leaves:
        assert f'opts["gatewayd {" ".join(path)}"]=' in script
        assert f".SS {' '.join(path)}".replace("-", "\\-") in page
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"\\fB{option.replace('-', chr(92) + '-')}" in page, (path, option)
                assert option in script.split(f'opts["gatewayd {" ".join(path)}"]="')[1].split('"')[0]


@pytest.mark.skipif(shutil.which("groff") is None, reason="no groff")
def test_the_man_page_is_valid_roff_and_reads_as_the_help(capsys):
    assert main(["man"]) == 0
    page = capsys.readouterr().out
    assert page.startswith(".TH GATEWAYD 8 ")
    done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=page, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = subprocess.run(["groff", "-man", "-Tascii", "-P-c", "-P-b", "-P-u"], input=page, capture_output=True,
                          text=True).stdout
    flat = " ".join(text.split()).replace("- ", "-")
    assert "gatewayd restore [-h] --config CONFIG file" in flat
    assert "refused while any gate runs on the chamber" in flat


def test_completion_command_prints_the_script(capsys):
    assert main(["completion", "bash"]) == 0
    out = capsys.readouterr().out
    assert out == bash_completion(_parser()) and out.rstrip().endswith("complete -o filenames -F _gatewayd gatewayd")
