"""Gateway config files written by a test and loaded as the gateway loads them: ``load`` gives the typed config,
``problems`` every problem of a config that must be refused.  ``HEAD`` is the smallest inner and outer section;
its certificates are in the ``config_dir`` fixture (tests/conftest.py), where the files are written."""

import pytest

from gateway.config.model import load_config
from gateway.config.errors import ConfigError

HEAD = """
inner: {his: {host: 127.0.0.1, port: 2576}}
outer:
  tls: {certificate: certs/server.pem, private_key: certs/server.key, client_ca: certs/ca.pem}
"""


def load(directory, text, head=HEAD):
    path = directory / "g.yaml"
    path.write_text(head + text, encoding="utf-8")
    return load_config(path)


def problems(directory, text, head=HEAD):
    """Every problem of the config as 'line:key: message' (the config must be refused)."""
    with pytest.raises(ConfigError) as e:
        load(directory, text, head)
    return [f"{i.line}:{i.key}: {i.message}" for i in e.value.issues]
