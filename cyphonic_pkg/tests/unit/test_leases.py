"""Persistent lease store shared by the DHCPv4 and DHCPv6 servers."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from cyphonic.adapter.leases import FORMAT, VERSION, LeaseStore, LeaseStoreError

MAC = "02:00:00:00:00:10"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "leases.json"


def test_put_get_all_delete(path: Path) -> None:
    store = LeaseStore(path)
    assert store.get("dhcp4", MAC) is None and store.all("dhcp4") == {}
    store.put("dhcp4", MAC, {"state": "bound", "vip4": "10.64.0.10", "expires": 1.5})
    store.put("dhcp6", "duid:iaid", {"state": "bound", "vip6": "fd00::10"})
    assert store.get("dhcp4", MAC) == {"state": "bound", "vip4": "10.64.0.10", "expires": 1.5}
    assert store.all("dhcp4") == {MAC: {"state": "bound", "vip4": "10.64.0.10", "expires": 1.5}}
    assert list(store.all("dhcp6")) == ["duid:iaid"]
    assert store.kinds() == ["dhcp4", "dhcp6"]
    assert store.delete("dhcp4", MAC) is True
    assert store.delete("dhcp4", MAC) is False and store.delete("nope", MAC) is False
    assert store.get("dhcp4", MAC) is None and store.kinds() == ["dhcp6"]


def test_survives_a_restart(path: Path) -> None:
    LeaseStore(path).put("dhcp4", MAC, {"state": "bound", "nested": {"a": [1, 2]}})
    again = LeaseStore(path)
    assert again.get("dhcp4", MAC) == {"state": "bound", "nested": {"a": [1, 2]}}
    document = json.loads(path.read_text())
    assert document["format"] == FORMAT and document["version"] == VERSION


def test_file_is_private_and_written_atomically(path: Path) -> None:
    store = LeaseStore(path)
    store.put("dhcp4", MAC, {"state": "bound"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store.put("dhcp4", MAC, {"state": "released"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["leases.json"]  # no temporary files left behind


def test_returned_records_are_copies(path: Path) -> None:
    store = LeaseStore(path)
    record: dict[str, Any] = {"state": "bound", "list": [1]}
    store.put("dhcp4", MAC, record)
    record["state"] = "changed"
    got = store.get("dhcp4", MAC)
    assert got is not None
    got["list"].append(2)
    store.all("dhcp4")[MAC]["state"] = "changed"
    assert store.get("dhcp4", MAC) == {"state": "bound", "list": [1]}


def test_corrupt_file_is_moved_aside(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="cyphonic.adapter.leases"):
        store = LeaseStore(path)
    assert store.all("dhcp4") == {}
    assert str(path) in caplog.text and "corrupt" in caplog.text
    aside = [p for p in path.parent.iterdir() if p.name.startswith("leases.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_text() == "{not json"
    assert not path.exists()
    store.put("dhcp4", MAC, {"state": "bound"})
    assert LeaseStore(path).get("dhcp4", MAC) == {"state": "bound"}


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "\xff\xfe",
        "[]",
        json.dumps({"format": "something-else", "version": 1, "leases": {}}),
        json.dumps({"format": FORMAT, "version": 99, "leases": {}}),
        json.dumps({"format": FORMAT, "version": VERSION, "leases": []}),
        json.dumps({"format": FORMAT, "version": VERSION, "leases": {"dhcp4": []}}),
        json.dumps({"format": FORMAT, "version": VERSION, "leases": {"dhcp4": {MAC: 3}}}),
    ],
    ids=["json", "utf8", "list", "format", "version", "leases", "kind", "record"],
)
def test_strict_mode_names_the_corrupt_file(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(LeaseStoreError, match=str(path)):
        LeaseStore(path, strict=True)
    assert path.read_bytes() == content.encode("latin-1")  # left as it was


def test_unreadable_file_raises(path: Path) -> None:
    path.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(LeaseStoreError, match="cannot read"):
        LeaseStore(path)


def test_failed_write_raises_and_keeps_state(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LeaseStore(path)
    store.put("dhcp4", MAC, {"state": "bound"})

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cyphonic.adapter.leases.os.replace", fail)
    with pytest.raises(LeaseStoreError, match="No space left"):
        store.put("dhcp4", MAC, {"state": "released"})
    with pytest.raises(LeaseStoreError):
        store.put("dhcp4", "02:00:00:00:00:11", {"state": "bound"})
    with pytest.raises(LeaseStoreError):
        store.delete("dhcp4", MAC)
    assert store.all("dhcp4") == {MAC: {"state": "bound"}}
    assert os.listdir(path.parent) == ["leases.json"]  # the temporary file was removed
    monkeypatch.undo()
    assert LeaseStore(path).all("dhcp4") == {MAC: {"state": "bound"}}


@pytest.mark.parametrize("record", [{"t": {1, 2}}, {"x": float("nan")}, ["not", "a", "dict"]])
def test_records_must_be_json(path: Path, record: Any) -> None:
    with pytest.raises(TypeError):
        LeaseStore(path).put("dhcp4", MAC, record)


def test_kind_and_key_must_be_strings(path: Path) -> None:
    store = LeaseStore(path)
    with pytest.raises(TypeError):
        store.put("", MAC, {})
    with pytest.raises(TypeError):
        store.put("dhcp4", 5, {})  # type: ignore[arg-type]
