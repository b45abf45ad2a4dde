"""Persistent lease store of the adapter's DHCP servers (DHCPv4 and DHCPv6 share one file).

A lease record is a small JSON object filed under a *kind* (``"dhcp4"``, ``"dhcp6"``, ...)
and a *key* within it (the GN's MAC for DHCPv4; DUID + IAID for DHCPv6)::

    store = LeaseStore("/var/lib/cyphonic/adapter/leases.json")
    store.put("dhcp4", "02:00:00:00:00:10", {"state": "bound", "vip4": "10.64.0.10", ...})
    store.get("dhcp4", "02:00:00:00:00:10")        # -> the record (a copy) or None
    store.all("dhcp4")                              # -> {key: record}
    store.delete("dhcp4", "02:00:00:00:00:10")     # -> True if it existed

Durability (RFC 2131 §3.1 step 4: the server "commits the binding for the client to persistent
storage" before it sends the DHCPACK): every :meth:`LeaseStore.put` and :meth:`~LeaseStore.delete`
rewrites the whole file before returning -- JSON to a temporary file in the same directory
(created with mode 0600), ``fsync``, ``rename`` over the old file, ``fsync`` of the directory --
so after a crash the file holds either the old or the new content, never a mix.  An adapter
serves tens to hundreds of GNs that renew every half lease time, so rewriting the whole file is
cheap.  One process owns the file (the adapter daemon); there is no locking between processes.

File format::

    {"format": "cyphonic-leases", "version": 1,
     "leases": {"dhcp4": {"02:00:00:00:00:10": {...}}, "dhcp6": {...}}}

A corrupt or foreign file (not JSON, wrong format marker or shape) is **moved aside** to
``<name>.corrupt-<unix time>`` and the store starts empty, with a WARNING naming both files;
``strict=True`` raises :class:`LeaseStoreError` naming the file instead.  Moving aside is the
default because nothing in a lease is irreplaceable here: each GN's VIPs are fixed by AS, so a
fresh store hands every GN the same address again, whereas refusing to start would take every
GN on the downlink offline over timing state; the old file is kept for inspection.  A file that
cannot be *read* (permissions, I/O error) always raises: that is an operator's problem, not
corruption, and starting empty would hide it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from cyphonic.errors import CyphonicError

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "VERSION", "LeaseStore", "LeaseStoreError"]

FORMAT: Final = "cyphonic-leases"
VERSION: Final = 1

Record = dict[str, Any]


class LeaseStoreError(CyphonicError):
    """The lease file cannot be read, parsed (``strict``) or written; the message names it."""


class LeaseStore:
    """Lease records by ``(kind, key)``, persisted to one JSON file (see module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, strict: bool = False) -> None:
        self.path = Path(path)
        self.strict = strict
        self._leases: dict[str, dict[str, Record]] = self._load()

    # -- reading -----------------------------------------------------------------------------

    def get(self, kind: str, key: str) -> Record | None:
        """A copy of the record filed under ``(kind, key)``, or None."""
        record = self._leases.get(kind, {}).get(key)
        return None if record is None else copy.deepcopy(record)

    def all(self, kind: str) -> dict[str, Record]:
        """Copies of every record of ``kind``, by key."""
        return copy.deepcopy(self._leases.get(kind, {}))

    def kinds(self) -> list[str]:
        """The kinds that have at least one record."""
        return sorted(k for k, v in self._leases.items() if v)

    # -- writing -----------------------------------------------------------------------------

    def put(self, kind: str, key: str, record: Record) -> None:
        """File ``record`` (a JSON-serialisable dict) under ``(kind, key)`` and persist it.

        Raises ``TypeError`` for a record JSON cannot encode and :class:`LeaseStoreError` if the
        file cannot be written (the in-memory state is then left as it was).
        """
        _check_name("kind", kind)
        _check_name("key", key)
        if not isinstance(record, dict):
            raise TypeError(f"lease record must be a dict, not {type(record).__name__}")
        try:
            clean = json.loads(json.dumps(record, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"lease record {kind}/{key} is not JSON-serialisable: {exc}") from exc
        bucket = self._leases.setdefault(kind, {})
        old = bucket.get(key)
        bucket[key] = clean
        try:
            self._save()
        except LeaseStoreError:
            if old is None:
                del bucket[key]
            else:
                bucket[key] = old
            raise

    def delete(self, kind: str, key: str) -> bool:
        """Remove the record under ``(kind, key)``; True if there was one."""
        bucket = self._leases.get(kind)
        if bucket is None or key not in bucket:
            return False
        old = bucket.pop(key)
        try:
            self._save()
        except LeaseStoreError:
            bucket[key] = old
            raise
        return True

    # -- the file ----------------------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, Record]]:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise LeaseStoreError(f"cannot read lease file {self.path}: {exc}") from exc
        try:
            return _parse(text)
        except ValueError as exc:
            problem = f"lease file {self.path} is corrupt: {exc}"
            if self.strict:
                raise LeaseStoreError(problem) from exc
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            try:
                os.replace(self.path, aside)
            except OSError as move_exc:
                raise LeaseStoreError(f"{problem}; cannot move it aside: {move_exc}") from exc
            log.warning("%s; moved it to %s and starting with no leases", problem, aside)
            return {}

    def _save(self) -> None:
        document = {"format": FORMAT, "version": VERSION, "leases": self._leases}
        data = json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"
        directory = self.path.parent
        tmp_name: str | None = None
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.")
            with os.fdopen(fd, "wb") as f:  # mkstemp creates the file with mode 0600
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, self.path)
            tmp_name = None
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise LeaseStoreError(f"cannot write lease file {self.path}: {exc}") from exc
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}: {len(v)}" for k, v in sorted(self._leases.items()))
        return f"LeaseStore({str(self.path)!r}, {{{counts}}})"


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"lease {what} must be a non-empty string, not {value!r}")


def _parse(text: bytes) -> dict[str, dict[str, Record]]:
    """The ``leases`` mapping of a lease file; ValueError saying what is wrong."""
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f'not a lease file (no "format": "{FORMAT}")')
    if document.get("version") != VERSION:
        raise ValueError(f"unsupported version {document.get('version')!r} (expected {VERSION})")
    leases = document.get("leases")
    if not isinstance(leases, dict):
        raise ValueError('"leases" is not an object')
    for kind, bucket in leases.items():
        if not isinstance(bucket, dict):
            raise ValueError(f'"leases.{kind}" is not an object')
        for key, record in bucket.items():
            if not isinstance(record, dict):
                raise ValueError(f'"leases.{kind}.{key}" is not an object')
    return leases
