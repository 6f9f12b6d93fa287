"""The fixtures several test modules share (pytest finds them here; the modules do not import them).

The helpers they build on are plain modules beside the tests (tests/unit/outer_gate.py, ...); pytest rewrites
the asserts of those too, so that a failing check inside a helper explains itself as one in a test does.
"""

import pytest

pytest.register_assert_rewrite("tests.unit")

import json  # noqa: E402 (after the rewrite is registered)

from OpenSSL import crypto  # noqa: E402

from adapters.outer.oauth import OAuthClient, load_public_keys  # noqa: E402
from gateway.ops.devca import init_dev_ca  # noqa: E402
from tests.unit.client_assertions import EC256_KEY, EC384_KEY, RSA_KEY, SCOPES, jwk, pem  # noqa: E402
from tests.unit.outer_gate import PLATFORMS, Gate  # noqa: E402


# -- config files (tests/unit/config_files.py) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    """A directory with a dev CA in certs/ (the files config_files.HEAD names); the configs are written there."""
    directory = tmp_path_factory.mktemp("cfg")
    init_dev_ca(directory / "certs")
    return directory


# -- the outer gate in-process (tests/unit/outer_gate.py) -------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The dev CA's client certificates of the platforms the unit Gate knows, by platform name (a module may
    override this fixture to issue more: the ``gate`` fixture takes the module's)."""
    directory = tmp_path_factory.mktemp("certs")
    init_dev_ca(directory, platforms=PLATFORMS)
    return {p: crypto.load_certificate(crypto.FILETYPE_PEM, (directory / f"platform-{p}.pem").read_bytes())
            for p in PLATFORMS}


@pytest.fixture
def gate(chamber_backend, certs):
    """A unit Gate on its own chamber, once on each backend (chamber_backend), stopped and closed after the test."""
    g = Gate(None, certs, backend=chamber_backend())
    yield g
    g.booking.stop()
    g.chamber.close()


# -- platforms' keys for client assertions (tests/unit/client_assertions.py) -------------------------------------

@pytest.fixture(scope="module")
def keyfiles(tmp_path_factory):
    """The platforms' public keys as a hospital registers them: demo's as PEM, other's as a JWKS of two EC keys."""
    d = tmp_path_factory.mktemp("keys")
    (d / "demo.pem").write_bytes(pem(RSA_KEY))
    (d / "other.jwks").write_text(json.dumps({"keys": [jwk(EC384_KEY, "ec-1"), jwk(EC256_KEY, "ec-2")]}))
    return d


@pytest.fixture(scope="module")
def clients(keyfiles):
    """The OAuth clients of those keys: demo (RS384/ES384, 300 s tokens, every scope), other (ES384/ES256/RS384,
    120 s, read-only)."""
    return {
        "demo": OAuthClient("demo", load_public_keys(keyfiles / "demo.pem"), frozenset({"RS384", "ES384"}), 300,
                            SCOPES),
        "other": OAuthClient("other", load_public_keys(keyfiles / "other.jwks"),
                             frozenset({"ES384", "ES256", "RS384"}), 120, ("Slot.read", "Schedule.read")),
    }


# -- the chamber on each backend (gateway/chamber/backends.py; docs/chamber.md) ---------------------------------

@pytest.fixture(scope="session")
def chamber_postgres():
    """One real PostgreSQL server for the session's chambers (tests/databases.py: a process from Debian's package,
    in a temporary directory, as the package's user when the tests run as root), with a database ``chamber`` that
    sorts text bytewise as the chamber needs; each test's chambers get schemas of their own in it.  Skipped without
    the package, failed without it in CI."""
    from tests.databases import server

    pg = server("postgresql", settings=("fsync=off", "max_connections=400", "shared_buffers=32MB"))
    import psycopg

    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE chamber TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C' ENCODING 'UTF8'")
    yield pg
    pg.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def chamber_backend(request, tmp_path):
    """Backends for a test's chambers, once on SQLite and once on PostgreSQL: ``chamber_backend(name='c')`` gives
    the backend of the chamber ``name`` (the same name, the same chamber: a file in tmp_path, or a schema of its
    own in the session's PostgreSQL)."""
    from gateway.chamber.backends import SqliteBackend

    if request.param == "sqlite":
        return lambda name="c": SqliteBackend(tmp_path / f"{name}.sqlite3")
    pg = request.getfixturevalue("chamber_postgres")
    import uuid

    import psycopg

    from gateway.chamber.postgresql import PostgresBackend

    prefix = "t" + uuid.uuid4().hex[:12]
    made: set[str] = set()

    def backend(name="c"):
        schema = f"{prefix}_{name}"
        if schema not in made:
            with psycopg.connect(pg.dsn("chamber"), autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {schema}")
            made.add(schema)
        return PostgresBackend(pg.dsn("chamber", options=f"-csearch_path={schema}"))

    return backend
