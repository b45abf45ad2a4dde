"""Configuration: good files load; every mistake names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cyphonic.config import load_cloud_config, load_node_config
from cyphonic.errors import ConfigError

NODE = """
[node]
fqdn = "a.cyphonic.test"
state_dir = "/var/lib/cyphonic"
[as]
host = "198.51.100.10"
"""

CLOUD = """
[cloud]
domain = "cyphonic.test"
state_dir = "/var/lib/cyphonic-cloud"
[nms]
listen = ["0.0.0.0:4502"]
public = ["198.51.100.10:4502"]
[pools]
vip4 = "10.64.0.0/16"
vip6 = "fd43:5950::/64"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_node_defaults(tmp_path: Path) -> None:
    cfg = load_node_config(write(tmp_path, NODE))
    assert cfg.fqdn == "a.cyphonic.test"
    assert cfg.port == 30000 and cfg.as_port == 4501
    assert cfg.tun_name == "cyph0" and cfg.mtu == 1400
    assert cfg.resolver_listen == [("127.0.0.1", 53)]
    assert cfg.ca_cert == Path("/var/lib/cyphonic/ca.crt")


def test_cloud_defaults(tmp_path: Path) -> None:
    cfg = load_cloud_config(write(tmp_path, CLOUD))
    assert cfg.nms_public == ["198.51.100.10:4502"]
    assert cfg.as_listen == [("0.0.0.0", 4501)]
    assert str(cfg.pool4) == "10.64.0.0/16"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (NODE.replace('fqdn = "a.cyphonic.test"\n', ""), "[node] fqdn: missing required key"),
        (NODE.replace('"a.cyphonic.test"', "5"), "[node] fqdn: expected str, got int"),
        (NODE + "[tun]\nmtu = 100\n", "[tun] mtu: mtu must be between"),
        (NODE + "[tun]\nmut = 1400\n", "[tun] mut: unknown key"),
        (NODE + '[resolver]\nlisten = ["nope"]\n', "[resolver] listen: bad endpoint"),
        (NODE + "[bogus]\n", "unknown table [bogus]"),
        (NODE.replace("a.cyphonic.test", "a.example.org"), "is not under the domain"),
        (NODE.replace('[as]\nhost = "198.51.100.10"\n', ""), "missing required table [as]"),
        (NODE + "[node2]\n", "unknown table"),
        ("not toml = = 1", "not valid TOML"),
    ],
)
def test_node_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_node_config(path)
    assert str(path) in str(exc.value)
    assert needle in str(exc.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (CLOUD.replace('vip4 = "10.64.0.0/16"', 'vip4 = "10.64.0.0/33"'), "[pools] vip4"),
        (CLOUD.replace('vip4 = "10.64.0.0/16"', 'vip4 = "10.64.0.0/31"'), "pool too small"),
        (
            CLOUD.replace('public = ["198.51.100.10:4502"]\n', "").replace(
                '"0.0.0.0:4502"', '"0.0.0.0:4502"'
            ),
            "[nms] public: required",
        ),
        (CLOUD.replace('domain = "cyphonic.test"', 'domain = "bad domain"'), "[cloud] domain"),
        (CLOUD + "\n[as]\nport = 1\n", "[as] port: unknown key"),
    ],
)
def test_cloud_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_cloud_config(path)
    assert needle in str(exc.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_node_config(tmp_path / "nope.toml")
