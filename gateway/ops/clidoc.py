"""Shell completion and the man page, generated from the CLI's own argparse parser (gateway/cli.py), so that
neither can drift from the commands: ``gatewayd completion bash`` and ``gatewayd man`` print them, and the
.deb installs what they print (packaging/dist.py).

The walk (:func:`commands`) gives each command path (``("queue", "list")``) its parser; completion offers, at
each point, the sub-commands, the options, an option's choices, and file names where a value is a path.
"""

from __future__ import annotations

import argparse
import re
from datetime import date
from pathlib import Path


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), help_: str | None = None):
    """(command path, its parser, its one-line help) for the parser and every sub-command, depth first."""
    yield path, parser, (parser.description or "") if help_ is None else help_
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield from commands(sub, path + (name,), helps.get(name, ""))


def _subcommands(parser) -> list[str]:
    return [name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]


def _options(parser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS]


def _positionals(parser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def _takes_value(action) -> bool:
    return action.nargs != 0


def _is_path(action) -> bool:
    return action.type is Path


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for ``parser.prog`` (source it, or install it in
    /usr/share/bash-completion/completions/)."""
    prog = parser.prog
    fn = "_" + re.sub(r"\W", "_", prog)
    lines = [f"# bash completion for {prog}: generated from its argparse parser ({prog} completion bash)",
             f"{fn}() {{",
             "    local cur prev key w i",
             '    cur="${COMP_WORDS[COMP_CWORD]}"',
             '    prev="${COMP_WORDS[COMP_CWORD-1]}"',
             "    local -A subs opts values files",
             ]
    for path, sub, _ in commands(parser):
        key = " ".join((prog,) + path)
        lines.append(f'    subs["{key}"]="{" ".join(_subcommands(sub))}"')
        lines.append(f'    opts["{key}"]="{" ".join(o for a in _options(sub) for o in a.option_strings)}"')
        for action in _options(sub):
            for option in action.option_strings:
                if action.choices:
                    lines.append(f'    values["{key} {option}"]="{" ".join(map(str, action.choices))}"')
                elif _takes_value(action):
                    lines.append(f'    files["{key} {option}"]={1 if _is_path(action) else 0}')
        if any(_is_path(a) for a in _positionals(sub)):
            lines.append(f'    files["{key}"]=1')
    lines += [
        f'    key="{prog}"',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        w="${COMP_WORDS[i]}"',
        '        if [[ " ${subs[$key]} " == *" $w "* ]]; then key="$key $w"; fi',
        "    done",
        '    if [[ -n "${values[$key $prev]+set}" ]]; then',
        '        COMPREPLY=($(compgen -W "${values[$key $prev]}" -- "$cur")); return',
        "    fi",
        '    if [[ -n "${files[$key $prev]+set}" ]]; then',
        '        if [[ "${files[$key $prev]}" == 1 ]]; then COMPREPLY=($(compgen -f -- "$cur")); fi',
        "        return",
        "    fi",
        '    if [[ "$cur" == -* ]]; then',
        '        COMPREPLY=($(compgen -W "${opts[$key]}" -- "$cur"))',
        '    elif [[ -n "${subs[$key]}" ]]; then',
        '        COMPREPLY=($(compgen -W "${subs[$key]}" -- "$cur"))',
        '    elif [[ "${files[$key]}" == 1 ]]; then',
        '        COMPREPLY=($(compgen -f -- "$cur"))',
        "    fi",
        "}",
        f"complete -o filenames -F {fn} {prog}",
        ""]
    return "\n".join(lines)


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _usage(path: tuple[str, ...], parser) -> str:
    usage = " ".join(parser.format_usage().split())
    return usage[len("usage: "):] if usage.startswith("usage: ") else usage


#: what an argument without a help of its own is
_DEFAULT_HELP = {"config": "the gateway's config file (YAML; docs/install.md)", "path": "the config file (YAML)"}


def man_page(parser: argparse.ArgumentParser, version: str, *, section: int = 8, today: date | None = None,
             see_also: tuple[str, ...] = ()) -> str:
    """The man page (roff, ``man -l`` shows it) of ``parser``: every command with its usage and help, and
    every option with its help."""
    prog = parser.prog
    lines = [f'.TH {prog.upper()} {section} "{(today or date.today()).isoformat()}" "{_roff(version)}" '
             f'"System Administration"',
             ".SH NAME", f"{prog} \\- {_roff(parser.description or '')}",
             ".SH SYNOPSIS", f".B {prog}", "\\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
             ".SH COMMANDS"]
    for path, sub, help_ in commands(parser):
        if not path or _subcommands(sub):
            continue
        lines += [".SS " + _roff(" ".join(path)), ".B " + _roff(_usage(path, sub)), ".PP", _roff(help_)]
        for action in _positionals(sub) + [a for a in _options(sub) if a.dest != "help"]:
            name = ", ".join(action.option_strings) if action.option_strings else (action.metavar or action.dest)
            value = ""
            if action.option_strings and _takes_value(action):
                value = " " + ("{" + ",".join(map(str, action.choices)) + "}" if action.choices
                               else (action.metavar or action.dest.upper()))
            lines += [".TP", f"\\fB{_roff(name)}\\fR{_roff(value)}",
                      _roff((action.help or "").replace("%%", "%") or _DEFAULT_HELP.get(action.dest, ""))]
    lines += [".SH OPTIONS", ".TP", "\\fB\\-\\-version\\fR", "the version and the git commit it was built from",
              ".TP", "\\fB\\-h\\fR, \\fB\\-\\-help\\fR", "the help of the command (after it) or of gatewayd"]
    if see_also:
        lines += [".SH SEE ALSO", ", ".join(f"\\fB{_roff(s)}\\fR" for s in see_also)]
    return "\n".join(lines) + "\n"
