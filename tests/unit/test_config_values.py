"""Values in gateway.yaml that the library calls behind a key's check do not take (a time zone that is a
directory, a pattern that cannot be compiled) are refused as issues at their key, like any other mistake: the
loader raises ConfigError and nothing else. Found by the fuzz campaign (tests/fuzz/fuzz_config.py) and by
reading the checks it led to."""

import pytest

from gateway.config import load_config
from gateway.confschema import ConfigError
from gateway.devca import init_dev_ca

HEAD = """
inner: {his: {host: 127.0.0.1, port: 2576}}
"""


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    init_dev_ca(d / "certs")
    return d


def issues(directory, text, head=HEAD):
    path = directory / "g.yaml"
    path.write_text(head + text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return [(i.key, i.message) for i in e.value.issues]


@pytest.mark.parametrize("zone", ["Asia", "America", "x" * 300, "Asia/Shanghai/"])
def test_a_time_zone_that_is_not_one_is_an_issue(directory, zone):
    """hospital.timezone 'Asia' (a directory of the time zone database: IsADirectoryError) or a name too long
    for a file name (OSError) came out of the loader as a traceback."""
    assert issues(directory, f"hospital: {{timezone: '{zone}'}}\n") == [
        ("hospital.timezone", f"unknown time zone {zone!r} (use e.g. Asia/Shanghai)")]


def test_a_charset_with_a_nul_is_an_issue(directory):
    """inner.his.charset 'utf\\0-8' (codecs.lookup raises ValueError, not LookupError) came out of the loader
    as a traceback."""
    found = issues(directory, 'inner: {his: {host: 127.0.0.1, port: 2576, charset: "utf\\0-8"}}\n', head="")
    assert found == [("inner.his.charset", "unknown charset 'utf\\x00-8' (use utf-8, gb18030, latin-1 or ascii)")]


@pytest.mark.parametrize("pattern, why", [("[0-9]{99999999999}", "the repetition number is too large"),
                                          ("(" * 600 + ")" * 600, "nested too deeply")])
def test_a_value_pattern_re_cannot_compile_is_an_issue(directory, pattern, why):
    """patients.identifiers[].value_pattern: re.compile raises OverflowError for a huge repetition count and
    RecursionError for deep nesting, not re.error; both came out of the loader as a traceback."""
    [(key, message)] = issues(directory, f"patients: {{identifiers: [{{system: 'urn:x:y', type: MR, "
                                         f"value_pattern: '{pattern}'}}]}}\n")
    assert key == "patients.identifiers[0].value_pattern" and message.startswith("not a regular expression: ")
    assert why in message
