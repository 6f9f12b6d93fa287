"""The chamber's keys (chamber.backend, chamber.postgresql): what is refused, with its line and key, and what a
valid PostgreSQL chamber section gives the backend — never its password in the config or in a log."""

import pytest

from tests.unit import config_files

PLATFORM = "platforms: [{name: p1, certificate_subject: CN=p1}]\n"


def problems(directory, text):
    return config_files.problems(directory, PLATFORM + text)


def load(directory, text):
    return config_files.load(directory, PLATFORM + text)


def test_postgresql_needs_its_section_and_sqlite_refuses_one(config_dir):
    assert problems(config_dir, "chamber: {backend: postgresql}\n") == [
        "6:chamber.postgresql: backend postgresql needs this section (at least its dsn)"]
    assert problems(config_dir, "chamber:\n  postgresql: {dsn: 'dbname=gw', sslmode: disable}\n") == [
        "7:chamber.postgresql: given, but backend is sqlite: set backend: postgresql, or remove it"]


@pytest.mark.parametrize("dsn, message", [
    ("host=db password=secret dbname=gw", "give password as password_file or password_env, not in the connection "
                                          "string (never a password in the config file)"),
    ("postgresql://gw:secret@db/gw", "give password as password_file or password_env, not in the connection "
                                     "string (never a password in the config file)"),
    ("host=db dbname=gw sslmode=require", "give sslmode as sslmode, not in the connection string"),
    ("host=db user=gw", "name the database (dbname=..., or /dbname in the URI)"),
    ("host=db dbname", "not a libpq connection string: "),
])
def test_a_connection_string_is_refused_at_its_line_and_never_quoted(config_dir, dsn, message):
    found = problems(config_dir, f"chamber:\n  backend: postgresql\n  postgresql:\n    dsn: '{dsn}'\n"
                                 f"    sslmode: disable\n")
    assert len(found) == 1 and found[0].startswith(f"9:chamber.postgresql.dsn: {message}"), found
    assert "secret" not in found[0]


def test_tls_that_checks_the_server_needs_its_ca_and_one_password_source(config_dir):
    assert problems(config_dir, "chamber:\n  backend: postgresql\n  postgresql:\n    dsn: 'host=db dbname=gw'\n"
                                "    password_env: GW_DB\n    password_file: certs/ca.pem\n") == [
        "9:chamber.postgresql.sslrootcert: sslmode verify-full checks the server's certificate: give the CA that "
        "signs it (or sslmode: require / disable)",
        "10:chamber.postgresql.password_env: give password_file or password_env, not both"]


def test_a_valid_section_gives_the_backend_with_the_password_from_the_environment(config_dir, monkeypatch):
    from gateway.chamber.backends import backend_for
    from gateway.chamber.errors import ChamberError

    config = load(config_dir, "chamber:\n  backend: postgresql\n  postgresql:\n"
                              "    dsn: 'host=db.example port=6543 dbname=gw user=gatewayd'\n"
                              "    password_env: GW_DB_PASSWORD\n    sslrootcert: certs/ca.pem\n")
    monkeypatch.delenv("GW_DB_PASSWORD", raising=False)
    with pytest.raises(ChamberError, match="GW_DB_PASSWORD is not set"):
        backend_for(config.chamber)
    monkeypatch.setenv("GW_DB_PASSWORD", "s3cret")
    backend = backend_for(config.chamber)
    assert backend.kind == "postgresql" and backend.target == "postgresql://db.example:6543/gw"
    assert backend._params["password"] == "s3cret" and backend._params["sslmode"] == "verify-full"
    assert backend._params["sslrootcert"] == str(config_dir / "certs" / "ca.pem")
    assert "s3cret" not in repr(vars(backend).get("target")) and "s3cret" not in backend._dsn
