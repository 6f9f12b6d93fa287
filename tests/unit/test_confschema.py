"""Tests for gateway.config.schema: typed YAML loading whose errors name file, line, column and key path."""

from __future__ import annotations

import enum
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
from hypothesis import given, settings, strategies as st

from gateway.config import schema as confschema
from gateway.config.errors import ConfigError, ConfigIssue
from gateway.config.fields import DirPath, Duration, Pattern, Percent, Range, ReadableFile
from gateway.config.reference import describe
from gateway.config.schema import load, load_text


# --- schemas used by the tests ------------------------------------------------------------------

@dataclass(frozen=True)
class Listener:
    listen: Annotated[str, Pattern(r'^[^:\s]+:\d+$', 'a host:port such as 0.0.0.0:2575')] = field(
        metadata={'doc': 'where the gate listens'})
    port: Annotated[int, Range(1, 65535)] = field(metadata={'doc': 'TCP port'})
    tls: bool = field(default=False, metadata={'doc': 'require TLS'})


@dataclass(frozen=True)
class Platform:
    name: str
    certificate_subject: str = field(metadata={'doc': 'subject of the client certificate'})
    share: Percent = field(default=0.05, metadata={'doc': 'share of the slots offered'})
    timeout: Duration = 30.0


@dataclass(frozen=True)
class Gateway:
    server: Listener
    platforms: list[Platform] = field(default_factory=list, metadata={'doc': 'internet platforms'})
    mode: Literal['strict', 'lenient'] = 'strict'
    note: Optional[str] = None


def issues_of(text: str, schema=Gateway, base_dir: Path = Path('/nonexistent')) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        load_text(textwrap.dedent(text), schema, filename='gw.yaml', base_dir=base_dir)
    return caught.value.issues


def only_issue(text: str, schema=Gateway, **kw) -> ConfigIssue:
    found = issues_of(text, schema, **kw)
    assert len(found) == 1, found
    return found[0]


def where(issue: ConfigIssue) -> tuple[int, int, str]:
    return issue.line, issue.column, issue.key


def load_ok(text: str, schema, base_dir: Path = Path('/nonexistent')):
    return load_text(textwrap.dedent(text), schema, filename='gw.yaml', base_dir=base_dir)


GOOD = """\
server:
  listen: 0.0.0.0:2575
  port: 2575
"""


# --- the issue and error types ------------------------------------------------------------------

def test_issue_str_is_file_line_column_key_message():
    """ConfigIssue renders as file:line:column: key: message, and ConfigError as one issue per line."""
    a = ConfigIssue('gw.yaml', 3, 7, 'server.port', 'bad')
    b = ConfigIssue('gw.yaml', 9, 1, 'mode', 'worse')
    assert str(a) == 'gw.yaml:3:7: server.port: bad'
    assert str(ConfigError([a, b])) == 'gw.yaml:3:7: server.port: bad\ngw.yaml:9:1: mode: worse'


def test_whole_file_issue_has_no_key_part():
    """An issue about the whole file (key '') is shown without an empty key field."""
    assert str(ConfigIssue('gw.yaml', 1, 1, '', 'the file is empty')) == 'gw.yaml:1:1: the file is empty'


# --- each kind of error, located ----------------------------------------------------------------

def test_valid_file_loads_with_defaults():
    """A minimal valid file gives the dataclass tree, with defaults and default factories applied."""
    config = load_ok(GOOD, Gateway)
    assert config == Gateway(server=Listener(listen='0.0.0.0:2575', port=2575, tls=False),
                             platforms=[], mode='strict', note=None)


def test_unknown_key_is_reported_at_the_key_with_a_suggestion():
    """A misspelt key is reported at the key itself, with the closest allowed key suggested."""
    found = issues_of("""\
        server:
          lisen: 0.0.0.0:2575
          port: 2575
        """)
    unknown = [i for i in found if 'unknown' in i.message]
    assert [where(i) for i in unknown] == [(2, 3, 'server.lisen')]
    assert unknown[0].message == "unknown key 'lisen'; did you mean 'listen'?"


def test_unknown_key_without_a_close_match_lists_the_allowed_keys():
    """When no key is close, the message lists what is allowed in that section."""
    issue = only_issue(GOOD + "zzz: 1\n")
    assert where(issue) == (4, 1, 'zzz')
    assert issue.message == "unknown key 'zzz'; the keys allowed here are: server, platforms, mode, note"


def test_missing_required_key_is_reported_at_the_parent_mapping():
    """A missing required key names its full path and points at the start of the section it belongs in."""
    issue = only_issue("""\
        mode: strict
        server:
          listen: 0.0.0.0:2575
        """)
    assert where(issue) == (3, 3, 'server.port')
    assert issue.message == "missing required key 'port'"


def test_missing_top_level_section():
    """A missing required section is reported at the top mapping."""
    issue = only_issue("mode: strict\n")
    assert where(issue) == (1, 1, 'server')
    assert issue.message == "missing required key 'server'"


def test_wrong_type_is_reported_at_the_value():
    """A value of the wrong type is reported at the value, quoting it."""
    issue = only_issue("""\
        server:
          listen: 0.0.0.0:2575
          port: abc
        """)
    assert where(issue) == (3, 9, 'server.port')
    assert issue.message == "expected an integer (a whole number), got 'abc'"


@pytest.mark.parametrize('value, message', [
    ('true', "expected an integer (a whole number), got 'true'"),
    ('2575.5', "expected an integer (a whole number), got '2575.5'"),
    ('"2575"', "expected an integer (a whole number), got the text '2575' in quotes; remove the quotes"),
    ('02575', "expected an integer (a whole number), got '02575'; write the number without the leading "
              "zero (YAML would read it as an octal number)"),
    ('42:55', "expected an integer (a whole number), got '42:55' (YAML would read it as a base-60 "
              "number); write a single number"),
    ('[1, 2]', "expected an integer (a whole number), got a list"),
    ('', "expected an integer (a whole number), got nothing (the value is empty)"),
])
def test_integer_field_refuses_bools_floats_quoted_and_ambiguous_numbers(value, message):
    """An integer field takes only a plain whole number: bool is not an int, and YAML 1.1's octal and
    base-60 readings are refused rather than silently applied."""
    issue = only_issue(f"server:\n  listen: a:1\n  port: {value}\n")
    assert issue.key == 'server.port' and issue.line == 3
    assert issue.message == message


def test_integer_forms_safe_load_accepts():
    """Integers resolve as safe_load resolves them (underscores, hex)."""
    assert load_ok("server: {listen: 'a:1', port: 0x10}\n", Gateway).server.port == 16
    assert load_ok("server: {listen: 'a:1', port: 2_575}\n", Gateway).server.port == 2575


@dataclass(frozen=True)
class Numbers:
    ratio: float
    flag: bool = False


@pytest.mark.parametrize('text, expected', [('1', 1.0), ('2.5', 2.5), ('-3', -3.0), ('1e3', 1000.0),
                                            ('1.5e-3', 0.0015)])
def test_float_field_accepts_ints_and_exponents(text, expected):
    """An int is fine where a float is expected; so is an exponent without a dot (text for YAML 1.1)."""
    value = load_ok(f"ratio: {text}\n", Numbers).ratio
    assert value == expected and type(value) is float


def test_float_field_refuses_bool():
    """true is not a number."""
    assert only_issue("ratio: true\n", Numbers).message == "expected a number, got 'true'"


@pytest.mark.parametrize('text, expected', [('true', True), ('false', False), ('True', True),
                                            ('FALSE', False)])
def test_bool_accepts_true_and_false(text, expected):
    """true/false in any capitalisation are booleans."""
    assert load_ok(f"ratio: 1\nflag: {text}\n", Numbers).flag is expected


@pytest.mark.parametrize('text', ['yes', 'no', 'on', 'Off'])
def test_bool_refuses_yaml11_yes_no_on_off(text):
    """yes/no/on/off (booleans in YAML 1.1) are refused with a message saying what to write."""
    issue = only_issue(f"ratio: 1\nflag: {text}\n", Numbers)
    assert where(issue) == (2, 7, 'flag')
    assert issue.message.startswith(f"expected true or false, got '{text}'; write true or false")


def test_bool_refuses_text_and_numbers():
    """A string or a number is not a bool."""
    assert only_issue('ratio: 1\nflag: "true"\n', Numbers).message == "expected true or false, got 'true'"
    assert only_issue('ratio: 1\nflag: 1\n', Numbers).message == "expected true or false, got '1'"


@dataclass(frozen=True)
class Texts:
    version: str
    country: str
    code: str
    when: str


def test_text_fields_keep_scalars_as_written():
    """Text fields are not subject to YAML 1.1's resolution: 2.10, NO, 007 and a date stay as written."""
    config = load_ok("version: 2.10\ncountry: NO\ncode: 007\nwhen: 2024-01-01\n", Texts)
    assert config == Texts(version='2.10', country='NO', code='007', when='2024-01-01')


def test_text_field_refuses_lists_sections_and_empty_values():
    """Only scalars are text."""
    found = issues_of("version: [a]\ncountry: {a: 1}\ncode:\nwhen: ~\n", Texts)
    assert [(i.key, i.message) for i in found] == [
        ('version', "expected text, got a list"),
        ('country', "expected text, got a section of keys"),
        ('code', "expected text, got nothing (the value is empty)"),
        ('when', "expected text, got nothing (the value is empty)"),
    ]


def test_custom_yaml_tags_are_refused():
    """Application-specific YAML tags (!foo) are not constructed."""
    issue = only_issue("version: !secret abc\ncountry: a\ncode: b\nwhen: c\n", Texts)
    assert issue.key == 'version' and "'!secret'" in issue.message


def test_range_and_pattern():
    """Range bounds and Pattern hints appear in the message."""
    found = issues_of("""\
        server:
          listen: nowhere
          port: 70000
        """)
    assert [(where(i), i.message) for i in found] == [
        ((2, 11, 'server.listen'), "expected a host:port such as 0.0.0.0:2575, got 'nowhere'"),
        ((3, 9, 'server.port'), "must be between 1 and 65535, got '70000'"),
    ]


@dataclass(frozen=True)
class Bounds:
    low: Annotated[int, Range(min=1)] = 5
    high: Annotated[float, Range(max=2.5)] = 1.0
    wait: Annotated[Duration, Range(max=3600)] = 1.0


def test_one_sided_ranges():
    """Range with only min or only max, and a Duration range shown in duration units."""
    found = issues_of("low: 0\nhigh: 3\nwait: 2h\n", Bounds)
    assert [i.message for i in found] == ["must be at least 1, got '0'", "must be at most 2.5, got '3'",
                                          "must be at most 1h, got '2h'"]


def test_literal_lists_allowed_values_and_suggests():
    """A Literal field lists the allowed values and suggests the closest."""
    issue = only_issue(GOOD + "mode: strct\n")
    assert where(issue) == (4, 7, 'mode')
    assert issue.message == "expected one of 'strict', 'lenient', got 'strct'; did you mean 'strict'?"


class Colour(enum.Enum):
    RED = 'red'
    BLUE = 'blue'


@dataclass(frozen=True)
class Choices:
    colour: Colour = Colour.RED
    level: Literal[1, 2, 3] = 1


def test_enum_and_non_text_literals():
    """Enum fields take a member's value; Literal of ints compares as ints."""
    assert load_ok("colour: blue\nlevel: 3\n", Choices) == Choices(Colour.BLUE, 3)
    found = issues_of("colour: green\nlevel: '3'\n", Choices)
    assert [i.key for i in found] == ['colour', 'level']
    assert found[0].message.startswith("expected one of 'red', 'blue', got 'green'")


# --- YAML syntax and whole-file problems --------------------------------------------------------

def test_yaml_syntax_error_is_a_single_issue_at_the_yaml_mark():
    """A YAML syntax error becomes one issue at the line/column the YAML parser reports."""
    issue = only_issue("server:\n  listen: a:1\n  port: [1, 2\nmode: strict\n")
    assert issue.key == ''
    assert (issue.line, issue.column) == (4, 5)
    assert issue.message.startswith('this is not valid YAML:')


def test_tab_indentation_gets_a_hint():
    """Tabs used for indentation are explained in plain words."""
    issue = only_issue("server:\n\tport: 1\n")
    assert (issue.line, issue.column) == (2, 1)
    assert issue.message.endswith('indent with spaces, not tab characters')


def test_two_documents_are_refused():
    """A second YAML document is refused with a plain explanation."""
    assert 'more than one YAML document' in only_issue(GOOD + "---\nmode: strict\n").message


@pytest.mark.parametrize('text', ["note: " + "[" * 3000 + "]" * 3000 + "\n", "note: " + "{a: " * 3000 + "}" * 3000])
def test_nesting_too_deep_for_the_yaml_reader_is_one_issue(text):
    """PyYAML composes nodes recursively: lists or sections nested some hundreds deep raised RecursionError out
    of the loader (found reading the YAML path while writing tests/fuzz/fuzz_config.py). Now one issue at
    the place the reader got to."""
    issue = only_issue(text)
    assert issue.key == '' and issue.line >= 1 and issue.column >= 1
    assert issue.message == "lists or sections are nested too deeply here for a configuration file"


@pytest.mark.parametrize('text', ['', '\n\n', '# only a comment\n'])
def test_empty_file(text):
    """A file with no content is one issue: the file is empty."""
    issue = only_issue(text)
    assert (where(issue), issue.message) == ((1, 1, ''), 'the file is empty')


def test_top_level_must_be_a_section():
    """A file holding a list instead of settings is reported at its start."""
    issue = only_issue("- a\n- b\n")
    assert where(issue) == (1, 1, '')
    assert issue.message.startswith("expected a section of settings")


def test_duplicate_keys_are_reported():
    """A key written twice in one section is an error (safe_load would silently keep the last)."""
    issue = only_issue(GOOD + "mode: strict\nmode: lenient\n")
    assert where(issue) == (5, 1, 'mode')
    assert issue.message == "key 'mode' appears more than once in this section (first on line 4); keep only one"


# --- many errors at once, nesting ----------------------------------------------------------------

def test_all_errors_are_reported_together_in_file_order():
    """Every problem in the file is reported in one ConfigError, sorted by position, with list paths."""
    found = issues_of("""\
        server:
          listen: 0.0.0.0:2575
          port: 0
          tsl: true
        platforms:
          - name: a
            certificate_subject: CN=a
          - name: b
            share: 5
        mode: fast
        """)
    assert [where(i) for i in found] == [
        (3, 9, 'server.port'),
        (4, 3, 'server.tsl'),
        (8, 5, 'platforms[1].certificate_subject'),
        (9, 12, 'platforms[1].share'),
        (10, 7, 'mode'),
    ]
    assert found[1].message == "unknown key 'tsl'; did you mean 'tls'?"
    assert found[2].message == "missing required key 'certificate_subject'"
    assert found[3].message == "must be between 0% and 100%, got '5'; for 5 percent write '5%'"


def test_nested_lists_of_sections_load():
    """A list of sections becomes a list of dataclasses, each with its defaults."""
    config = load_ok(GOOD + textwrap.dedent("""\
        platforms:
          - name: a
            certificate_subject: CN=platform-a
          - {name: b, certificate_subject: CN=platform-b, share: 10%, timeout: 5m}
        """), Gateway)
    assert config.platforms == [Platform('a', 'CN=platform-a', 0.05, 30.0),
                                Platform('b', 'CN=platform-b', 0.10, 300.0)]


@dataclass(frozen=True)
class Route:
    target: str
    retries: int = 3


@dataclass(frozen=True)
class Routing:
    routes: dict[str, Route]
    limits: dict[str, int] = field(default_factory=dict)
    matrix: list[list[int]] = field(default_factory=list)


def test_mapping_of_sections_and_nested_lists():
    """dict[str, T] entries are keyed by name in paths; lists of lists index twice."""
    config = load_ok("routes:\n  adt: {target: his}\n  'lab results': {target: lis, retries: 1}\n"
                     "limits: {a: 1}\nmatrix: [[1, 2], [3]]\n", Routing)
    assert config.routes == {'adt': Route('his'), 'lab results': Route('lis', 1)}
    assert config.limits == {'a': 1} and config.matrix == [[1, 2], [3]]
    found = issues_of("routes:\n  adt: {target: his, retries: x}\n  'lab results': {}\n"
                      "matrix: [[1, x]]\n", Routing)
    assert [i.key for i in found] == ['routes.adt.retries', "routes['lab results'].target", 'matrix[0][1]']


def test_empty_value_for_a_list_or_mapping_gets_a_hint():
    """'platforms:' with nothing after it is an error that says how to write an empty list."""
    found = issues_of("routes:\nlimits:\n", Routing)
    assert [(i.key, i.message) for i in found] == [
        ('routes', "expected a mapping of names to values, got nothing (the value is empty); "
                   "write {} for an empty mapping"),
        ('limits', "the value is empty; give a value, or remove the line to use the default"),
    ]
    issue = only_issue(GOOD + "platforms:\n")
    assert issue.message == "the value is empty; give a value, or remove the line to use the default"


def test_list_given_a_scalar():
    """A single value where a list is expected explains the list syntax."""
    issue = only_issue(GOOD + "platforms: demo\n")
    assert issue.message == "expected a list (one '- item' per line), got 'demo'"


# --- Optional, defaults ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Optionals:
    required_or_none: Optional[int]
    explicit: int | None = None
    defaulted: int = 7
    nested: Optional[Route] = None


@pytest.mark.parametrize('text, expected', [
    ('{}', Optionals(None, None, 7, None)),
    ('required_or_none: ~\nexplicit:\n', Optionals(None, None, 7, None)),
    ('required_or_none: 1\nexplicit: 2\ndefaulted: 3\nnested: {target: x}',
     Optionals(1, 2, 3, Route('x'))),
])
def test_optional_missing_or_null_is_none(text, expected):
    """Optional keys may be missing or empty (-> None), even without an explicit default."""
    assert load_ok(text, Optionals) == expected


def test_optional_still_checks_the_inner_type():
    """A present Optional value must still have the right type."""
    assert where(only_issue("explicit: abc\n", Optionals)) == (1, 11, 'explicit')


# --- Duration and Percent -------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    wait: Duration
    share: Percent = 0.0


@pytest.mark.parametrize('text, seconds', [
    ('30', 30.0), ('1.5', 1.5), ('0', 0.0), ('500ms', 0.5), ('30s', 30.0), ('5m', 300.0), ('2h', 7200.0),
    ('1d', 86400.0), ('1h30m', 5400.0), ('90 seconds', 90.0), ("'45'", 45.0), ('2.5m', 150.0),
])
def test_duration_parsing(text, seconds):
    """Durations are seconds: a number or text with units ms/s/m/h/d, also combined."""
    value = load_ok(f"wait: {text}\n", Timing).wait
    assert value == pytest.approx(seconds) and type(value) is float


@pytest.mark.parametrize('text, message', [
    ('-5', "a duration cannot be negative, got '-5'"),
    ('-5s', "a duration cannot be negative, got '-5s'"),
    ('5 parsecs', "expected a duration such as 30s, 5m, 2h or 500ms, got '5 parsecs'"),
    ('soon', "expected a duration such as 30s, 5m, 2h or 500ms, got 'soon'"),
    ('true', "expected a duration such as 30s, 5m, 2h or 500ms, got 'true'"),
    ('.inf', "expected a duration such as 30s, 5m, 2h or 500ms, got '.inf'"),
    ('1:30', "expected a duration such as 30s, 5m, 2h or 500ms, got '1:30' (YAML would read it as a "
             "base-60 number); write a single number"),
])
def test_duration_errors(text, message):
    """Negative, unit-less nonsense, bools and infinities are not durations."""
    issue = only_issue(f"wait: {text}\n", Timing)
    assert where(issue) == (1, 7, 'wait')
    assert issue.message == message


@pytest.mark.parametrize('text, fraction', [
    ('5%', 0.05), ('12.5 %', 0.125), ('0.05', 0.05), ('0', 0.0), ('1', 1.0), ('100%', 1.0), ("'0.5'", 0.5),
])
def test_percent_parsing(text, fraction):
    """Percentages are '5%' or a fraction 0..1."""
    assert load_ok(f"wait: 1\nshare: {text}\n", Timing).share == pytest.approx(fraction)


@pytest.mark.parametrize('text, message', [
    ('5', "must be between 0% and 100%, got '5'; for 5 percent write '5%'"),
    ('150%', "must be between 0% and 100%, got '150%'"),
    ('-0.1', "must be between 0% and 100%, got '-0.1'"),
    ('half', "expected a percentage such as 5% (or a fraction such as 0.05), got 'half'"),
    ('false', "expected a percentage such as 5% (or a fraction such as 0.05), got 'false'"),
])
def test_percent_errors(text, message):
    """Out-of-range and non-numeric percentages are refused; a bare 5 suggests '5%'."""
    issue = only_issue(f"wait: 1\nshare: {text}\n", Timing)
    assert where(issue) == (2, 8, 'share')
    assert issue.message == message


# --- paths ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Files:
    certificate: ReadableFile
    data_dir: DirPath
    extra: list[ReadableFile] = field(default_factory=list)


def test_readable_file_and_dir_resolve_relative_to_the_config_directory(tmp_path):
    """Relative paths resolve against the config file's directory; absolute ones stay; DirPath is not
    checked."""
    (tmp_path / 'certs').mkdir()
    (tmp_path / 'certs' / 'server.pem').write_text('x')
    other = tmp_path / 'other.pem'
    other.write_text('y')
    config_file = tmp_path / 'gatewayd.yaml'
    config_file.write_text(f"certificate: certs/server.pem\ndata_dir: var/chamber\nextra: ['{other}']\n")
    config = load(config_file, Files)
    assert config.certificate == tmp_path / 'certs' / 'server.pem'
    assert config.data_dir == tmp_path / 'var' / 'chamber'
    assert config.extra == [other]
    assert config.certificate.is_absolute()


def test_load_resolves_against_the_file_not_the_working_directory(tmp_path, monkeypatch):
    """load('conf/gw.yaml') resolves paths relative to conf/, whatever the current directory."""
    (tmp_path / 'conf').mkdir()
    (tmp_path / 'conf' / 'ca.pem').write_text('x')
    (tmp_path / 'conf' / 'gw.yaml').write_text("certificate: ca.pem\ndata_dir: d\n")
    monkeypatch.chdir(tmp_path)
    assert load('conf/gw.yaml', Files).certificate == tmp_path / 'conf' / 'ca.pem'


def test_missing_file_names_the_path_it_looked_for(tmp_path):
    """A ReadableFile that does not exist is reported at its value, naming the resolved path."""
    issue = only_issue("certificate: certs/nope.pem\ndata_dir: d\n", Files, base_dir=tmp_path)
    assert where(issue) == (1, 14, 'certificate')
    assert issue.message == f"file 'certs/nope.pem' (looked for {tmp_path}/certs/nope.pem) does not exist"


def test_a_directory_is_not_a_readable_file(tmp_path):
    """A directory given as a file is reported as such."""
    issue = only_issue(f"certificate: {tmp_path}\ndata_dir: d\n", Files, base_dir=tmp_path)
    assert issue.message == f"'{tmp_path}' is a directory, not a file"


@pytest.mark.parametrize("key, value, message", [
    ("certificate", '"certs/a\\0.pem"', "'certs/a\\x00.pem' is not a path: it contains a NUL character"),
    ("data_dir", '"var\\0"', "'var\\x00' is not a path: it contains a NUL character"),
    ("certificate", "~nosuchuser-gatewayd/ca.pem", "'~nosuchuser-gatewayd/ca.pem' is not a path: there is no "
                                                    "user 'nosuchuser-gatewayd' whose home directory ~ could name"),
    ("data_dir", "~nosuchuser-gatewayd", "'~nosuchuser-gatewayd' is not a path: there is no user "
                                         "'nosuchuser-gatewayd' whose home directory ~ could name"),
])
def test_a_path_no_system_call_takes_is_an_issue_at_its_key(tmp_path, key, value, message):
    """A NUL in a path (open() raises ValueError; found by the fuzz campaign, tests/fuzz/fuzz_config.py) or a
    ~user that does not exist (expanduser raises RuntimeError; found reading the same code) came out of the
    loader as a traceback, or for a DirPath was taken and failed at start-up."""
    (tmp_path / 'ok.pem').write_text('x')
    values = {"certificate": "ok.pem", "data_dir": "d", key: value}
    issue = only_issue("".join(f"{k}: {v}\n" for k, v in values.items()), Files, base_dir=tmp_path)
    assert (issue.key, issue.message) == (key, message)


def test_unreadable_file_is_reported_even_when_running_as_root(tmp_path, monkeypatch):
    """The permission branch, exercised by making open() fail the way it does for a non-root user."""
    secret = tmp_path / 'key.pem'
    secret.write_text('x')

    def refuse(path, mode='r', *a, **kw):
        raise PermissionError(13, 'Permission denied', str(path))
    monkeypatch.setattr(confschema, 'open', refuse, raising=False)
    issue = only_issue("certificate: key.pem\ndata_dir: d\n", Files, base_dir=tmp_path)
    assert where(issue) == (1, 14, 'certificate')
    assert issue.message == (f"file 'key.pem' (looked for {secret}) cannot be read: permission denied "
                             f"(check the file's owner and permissions)")


# --- cross-field checks -------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    name: str
    certificate_subject: str = ''


@dataclass(frozen=True)
class Checked:
    peers: list[Peer]
    primary: str = ''

    def __post_validate__(self) -> list[tuple[str, str]]:
        problems = []
        seen: dict[str, int] = {}
        for index, peer in enumerate(self.peers):
            if peer.certificate_subject in seen:
                problems.append((f'peers[{index}].certificate_subject',
                                 f"the same subject is already used by peers[{seen[peer.certificate_subject]}]"))
            seen.setdefault(peer.certificate_subject, index)
        if self.primary and self.primary not in {p.name for p in self.peers}:
            problems.append(('primary', f"no peer is named {self.primary!r}"))
        return problems


def test_post_validate_issues_are_located_at_the_named_key():
    """__post_validate__ pairs become issues at the key's line, with the full key path."""
    found = issues_of("""\
        peers:
          - name: a
            certificate_subject: CN=x
          - name: b
            certificate_subject: CN=x
        primary: c
        """, Checked)
    assert [(where(i), i.message) for i in found] == [
        ((5, 5, 'peers[1].certificate_subject'), "the same subject is already used by peers[0]"),
        ((6, 1, 'primary'), "no peer is named 'c'"),
    ]


def test_post_validate_falls_back_to_the_nearest_node_for_a_defaulted_key():
    """A cross-check on a key left at its default points at the nearest existing node."""
    found = issues_of("""\
        peers:
          - name: a
          - name: b
        """, Checked)
    assert [where(i) for i in found] == [(3, 5, 'peers[1].certificate_subject')]


@dataclass(frozen=True)
class Outer:
    inner: Checked
    other: int = 0


def test_post_validate_of_a_nested_section_gets_the_full_path():
    """A nested section's cross-checks are prefixed with the section's own path."""
    issue = only_issue("other: 1\ninner:\n  peers: []\n  primary: z\n", Outer)
    assert where(issue) == (4, 3, 'inner.primary')


def test_post_validate_runs_alongside_per_field_errors_elsewhere():
    """Cross-checks of valid sections are reported together with errors in other sections."""
    found = issues_of("other: x\ninner:\n  peers: []\n  primary: z\n", Outer)
    assert [i.key for i in found] == ['other', 'inner.primary']


@dataclass(frozen=True)
class SelfChecking:
    low: int
    high: int

    def __post_init__(self):
        if self.low > self.high:
            raise ValueError('low must not be above high')


def test_value_error_from_post_init_is_an_issue():
    """A ValueError raised by the dataclass itself is reported at its section."""
    issue = only_issue("low: 5\nhigh: 1\n", SelfChecking)
    assert (where(issue), issue.message) == ((1, 1, ''), 'low must not be above high')


# --- anchors and merges -----------------------------------------------------------------------

def test_anchors_aliases_and_merge_keys():
    """Anchors, aliases and merge keys work; the section's own keys win over merged ones."""
    config = load_ok("""\
        defaults: &defaults {target: his, retries: 5}
        routes:
          adt: *defaults
          lab:
            <<: *defaults
            retries: 1
        """, RoutingWithDefaults)
    assert config.routes == {'adt': Route('his', 5), 'lab': Route('his', 1)}


@dataclass(frozen=True)
class RoutingWithDefaults:
    routes: dict[str, Route]
    defaults: Optional[Route] = None


def test_merged_keys_are_still_checked():
    """A wrong key brought in by a merge is reported at its definition."""
    found = issues_of("""\
        defaults: &d {target: his, retires: 5}
        routes:
          lab:
            <<: *d
        """, RoutingWithDefaults)
    assert ('routes.lab.retires', 1) in [(i.key, i.line) for i in found]


# --- reading files ------------------------------------------------------------------------------

def test_load_names_the_file_in_issues(tmp_path):
    """load() uses the path it was given as the issue's file."""
    path = tmp_path / 'gatewayd.yaml'
    path.write_text(GOOD + "mode: fast\n")
    with pytest.raises(ConfigError) as caught:
        load(path, Gateway)
    assert str(caught.value).startswith(f"{path}:4:7: mode: expected one of")


def test_missing_config_file(tmp_path):
    """A config file that cannot be opened is a ConfigError too, not a traceback."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / 'nope.yaml', Gateway)
    assert caught.value.issues[0].message == 'cannot read the configuration file: No such file or directory'


def test_non_utf8_file(tmp_path):
    """A file saved in another encoding (e.g. GBK) is reported at the first bad byte."""
    path = tmp_path / 'gw.yaml'
    path.write_bytes(GOOD.encode() + 'note: 北京\n'.encode('gbk'))
    with pytest.raises(ConfigError) as caught:
        load(path, Gateway)
    issue = caught.value.issues[0]
    assert (issue.line, issue.column) == (4, 7)
    assert 'UTF-8' in issue.message


def test_utf8_with_bom_and_chinese_text(tmp_path):
    """A UTF-8 file with a byte-order mark (as Windows editors write) loads, Chinese text intact."""
    path = tmp_path / 'gw.yaml'
    path.write_bytes(b'\xef\xbb\xbf' + (GOOD + 'note: 医院\n').encode())
    assert load(path, Gateway).note == '医院'


# --- describe -----------------------------------------------------------------------------------

def test_describe_lists_every_key_with_type_default_and_doc():
    """describe() gives README rows for every key, nested sections included."""
    assert describe(Gateway) == [
        ('server', 'section', 'required', ''),
        ('server.listen', 'text: a host:port such as 0.0.0.0:2575', 'required', 'where the gate listens'),
        ('server.port', 'integer, 1 to 65535', 'required', 'TCP port'),
        ('server.tls', 'true/false', 'false', 'require TLS'),
        ('platforms', 'list of sections', '[]', 'internet platforms'),
        ('platforms[].name', 'text', 'required', ''),
        ('platforms[].certificate_subject', 'text', 'required', 'subject of the client certificate'),
        ('platforms[].share', 'percentage (e.g. 5%)', '5%', 'share of the slots offered'),
        ('platforms[].timeout', 'duration (e.g. 30s, 5m, 2h)', '30s', ''),
        ('mode', 'one of strict, lenient', 'strict', ''),
        ('note', 'text', 'null', ''),
    ]


def test_describe_mappings_optionals_and_paths():
    """Mappings of sections use <name>; Optional sections are described; paths have names."""
    rows = {r[0]: r for r in describe(Routing) + describe(Files) + describe(Optionals)}
    assert rows['routes.<name>.retries'] == ('routes.<name>.retries', 'integer', '3', '')
    assert rows['limits'][1:3] == ('mapping of names to integer', '{}')
    assert rows['matrix'][1] == 'list of list of integer'
    assert rows['certificate'][1] == 'path of a readable file'
    assert rows['data_dir'][1] == 'directory path'
    assert rows['required_or_none'][2] == 'null'
    assert rows['nested.target'][2] == 'required'


def test_unsupported_field_type_is_a_programming_error():
    """A schema using a type the loader does not know fails loudly, before any YAML is read."""
    @dataclass(frozen=True)
    class Bad:
        when: set[int]
    with pytest.raises(TypeError):
        load_text("when: [1]\n", Bad, filename='x', base_dir=Path('.'))
    with pytest.raises(TypeError):
        describe(Bad)


# --- robustness ---------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abc:-[]{}#&*!|>'\" \n\t.%0123456789platformsserverport")),
               max_size=80))
def test_arbitrary_text_gives_a_result_or_a_config_error(text):
    """Whatever the file contains, load_text returns or raises ConfigError with located issues — never
    another exception."""
    try:
        load_text(text, Gateway, filename='gw.yaml', base_dir=Path('/nonexistent'))
    except ConfigError as exc:
        assert exc.issues
        for issue in exc.issues:
            assert issue.line >= 1 and issue.column >= 1 and issue.message


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=65535))
def test_any_port_in_range_round_trips(port):
    """Every valid port loads as itself."""
    assert load_ok(f"server: {{listen: 'h:1', port: {port}}}\n", Gateway).server.port == port


@dataclass(frozen=True)
class PathDefaults:
    data: DirPath = DirPath(Path('var/chamber.sqlite3'))
    ca: ReadableFile = ReadableFile(Path('ca.pem'))
    absolute: DirPath = DirPath(Path('/var/lib/gatewayd'))


def test_relative_path_defaults_resolve_against_the_config_directory_too(tmp_path):
    """A path left at its default is resolved like a written one, and a ReadableFile default is checked."""
    (tmp_path / 'ca.pem').write_text('x')
    config = load_ok("absolute: /srv/x\n", PathDefaults, base_dir=tmp_path)
    assert config == PathDefaults(tmp_path / 'var' / 'chamber.sqlite3', tmp_path / 'ca.pem', Path('/srv/x'))
    assert load_ok("data: d\n", PathDefaults, base_dir=tmp_path).absolute == Path('/var/lib/gatewayd')
    (tmp_path / 'ca.pem').unlink()
    issue = only_issue("data: d\n", PathDefaults, base_dir=tmp_path)
    assert where(issue) == (1, 1, 'ca')
    assert issue.message == (f"file 'ca.pem' (the default for this key; looked for {tmp_path}/ca.pem) "
                             f"does not exist")
