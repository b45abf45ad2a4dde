"""CLI: bad configuration exits with one clear line naming the file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cyphonic.cli import format_status, main


def cyphonic(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cyphonic.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_node_with_missing_key(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nstate_dir = "/nonexistent"\n[as]\nhost = "192.0.2.1"\n')
    r = cyphonic("node", "--config", str(cfg))
    assert r.returncode == 1
    assert f"{cfg}: [node] fqdn: missing required key" in r.stderr
    assert "Traceback" not in r.stderr


def test_node_with_wrong_type(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[node]\nfqdn="a.cyphonic.test"\nstate_dir="/x"\nport="30000"\n[as]\nhost="192.0.2.1"\n'
    )
    r = cyphonic("node", "--config", str(cfg))
    assert r.returncode == 1 and "[node] port: expected int, got str" in r.stderr


def test_node_not_enrolled(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\nfqdn="a.cyphonic.test"\nstate_dir="{tmp_path}"\n[as]\nhost="192.0.2.1"\n'
    )
    r = cyphonic("node", "--config", str(cfg))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("cyphonic: error:")


def test_cloud_without_ca(tmp_path: Path) -> None:
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(
        f'[cloud]\nstate_dir="{tmp_path}"\n[nms]\npublic=["192.0.2.1:4502"]\n'
        '[pools]\nvip4="10.64.0.0/16"\nvip6="fd43:5950::/64"\n'
    )
    r = cyphonic("cloud", "--config", str(cfg))
    assert r.returncode == 1 and "cyphonic ca init" in r.stderr


def test_ca_init_token_and_check_config(tmp_path: Path) -> None:
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(
        f'[cloud]\nstate_dir="{tmp_path}"\n[nms]\npublic=["192.0.2.1:4502"]\n'
        '[pools]\nvip4="10.64.0.0/16"\nvip6="fd43:5950::/64"\n'
    )
    assert main(["ca", "init", "--config", str(cfg)]) == 0
    assert (tmp_path / "ca" / "ca.crt").exists()
    again = cyphonic("ca", "init", "--config", str(cfg))
    assert again.returncode == 1 and "Traceback" not in again.stderr
    tok = cyphonic("token", "create", "--config", str(cfg), "--fqdn", "a.cyphonic.test")
    assert tok.returncode == 0 and len(tok.stdout.strip()) >= 40
    bad = cyphonic("token", "create", "--config", str(cfg), "--fqdn", "a.example.org")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert cyphonic("check-config", "--kind", "cloud", "--config", str(cfg)).returncode == 0


def test_status_without_daemon(tmp_path: Path) -> None:
    r = cyphonic("status", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1 and "is it running?" in r.stderr


@pytest.mark.parametrize("registered", [True, False])
def test_format_status(registered: bool) -> None:
    text = format_status(
        {
            "fqdn": "a.cyphonic.test",
            "vip4": "10.64.0.2",
            "vip6": "fd43:5950::2",
            "registered": registered,
            "observed": {"4": "198.51.100.20:30000"},
            "peers": [
                {
                    "fqdn": "b.cyphonic.test",
                    "vip4": "10.64.0.3",
                    "vip6": "fd43:5950::3",
                    "path": "direct",
                    "reason": "common_family_public",
                    "endpoint": "198.51.100.30:30000",
                    "rx_bytes": 1,
                    "tx_bytes": 2,
                    "last_handshake": None,
                }
            ],
            "counters": {"replayed": 2},
        }
    )
    assert "b.cyphonic.test" in text and "replayed=2" in text
    assert ("NOT registered" in text) is not registered


def test_general_node_commands(tmp_path: Path) -> None:
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(
        f'[cloud]\nstate_dir="{tmp_path}"\n[nms]\npublic=["192.0.2.1:4502"]\n'
        '[pools]\nvip4="10.64.0.0/16"\nvip6="fd43:5950::/64"\n'
    )
    add = cyphonic(
        "general-node",
        "add",
        "--config",
        str(cfg),
        "--mac",
        "02:00:00:00:00:01",
        "--fqdn",
        "cam1.cyphonic.test",
        "--adapter",
        "ad1.cyphonic.test",
        "--json",
    )
    assert add.returncode == 0, add.stderr
    assert '"vip4": "10.64.' in add.stdout
    bad = cyphonic(
        "general-node",
        "add",
        "--config",
        str(cfg),
        "--mac",
        "02:00:00:00:00:02",
        "--fqdn",
        "cam1.cyphonic.test",
        "--adapter",
        "ad1.cyphonic.test",
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    lst = cyphonic("general-node", "list", "--config", str(cfg))
    assert "cam1.cyphonic.test" in lst.stdout
    assert (
        cyphonic("general-node", "remove", "--config", str(cfg), "cam1.cyphonic.test").returncode
        == 0
    )
    assert (
        cyphonic("general-node", "remove", "--config", str(cfg), "cam1.cyphonic.test").returncode
        == 1
    )
