import pytest

from tests.e2e.harness import Lock


@pytest.fixture(scope="module")
def lock(tmp_path_factory):
    """One running HIS simulator + gateway for the tests of a module (each test uses its own slots)."""
    with Lock(tmp_path_factory.mktemp("lock")) as running:
        yield running
