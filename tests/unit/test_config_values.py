"""Values in gateway.yaml that the library calls behind a key's check do not take (a time zone that is a
directory, a pattern that cannot be compiled) are refused as issues at their key, like any other mistake: the
loader raises ConfigError and nothing else. Found by the fuzz campaign (tests/fuzz/fuzz_config.py) and by
reading the checks it led to."""

import pytest

from gateway.config.model import load_config
from gateway.config.errors import ConfigError

INNER = "inner: {his: {host: 127.0.0.1, port: 2576}}\n"


def issues(tmp_path, text):
    """(key, message) of every issue of the config ``text`` (which must be refused)."""
    path = tmp_path / "g.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return [(i.key, i.message) for i in e.value.issues]


@pytest.mark.parametrize("zone", ["Asia", "America", "x" * 300, "Asia/Shanghai/"])
def test_a_time_zone_that_is_not_one_is_an_issue(tmp_path, zone):
    """hospital.timezone 'Asia' (a directory of the time zone database: IsADirectoryError) or a name too long
    for a file name (OSError) came out of the loader as a traceback."""
    assert issues(tmp_path, INNER + f"hospital: {{timezone: '{zone}'}}\n") == [
        ("hospital.timezone", f"unknown time zone {zone!r} (use e.g. Asia/Shanghai)")]


def test_a_charset_with_a_nul_is_an_issue(tmp_path):
    """inner.his.charset 'utf\\0-8' (codecs.lookup raises ValueError, not LookupError) came out of the loader
    as a traceback."""
    found = issues(tmp_path, 'inner: {his: {host: 127.0.0.1, port: 2576, charset: "utf\\0-8"}}\n')
    assert found == [("inner.his.charset", "unknown charset 'utf\\x00-8' (use utf-8, gb18030, latin-1 or ascii)")]


@pytest.mark.parametrize("pattern, why", [("[0-9]{99999999999}", "the repetition number is too large"),
                                          ("(" * 600 + ")" * 600, "nested too deeply")])
def test_a_value_pattern_re_cannot_compile_is_an_issue(tmp_path, pattern, why):
    """patients.identifiers[].value_pattern: re.compile raises OverflowError for a huge repetition count and
    RecursionError for deep nesting, not re.error; both came out of the loader as a traceback."""
    [(key, message)] = issues(tmp_path, INNER + f"patients: {{identifiers: [{{system: 'urn:x:y', type: MR, "
                                                f"value_pattern: '{pattern}'}}]}}\n")
    assert key == "patients.identifiers[0].value_pattern" and message.startswith("not a regular expression: ")
    assert why in message
