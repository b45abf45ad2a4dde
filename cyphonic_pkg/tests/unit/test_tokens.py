"""Tests of cyphonic.pki.tokens (one-time enrollment tokens)."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest

from cyphonic.errors import EnrollmentError
from cyphonic.pki.tokens import TokenError, check_token, consume_token, create_token, hash_token
from cyphonic.store.sqlite import SQLiteStore

NOW = 1_800_000_000.0
FQDN = "n1.cy.example"


@pytest.fixture
def store() -> SQLiteStore:
    return SQLiteStore(":memory:")


def test_token_is_256_random_bits_urlsafe(store: SQLiteStore) -> None:
    token = create_token(store, FQDN, 600, NOW)
    assert token.startswith("cyt_")  # never starts with "-": safe as a CLI argument
    assert len(token) == 4 + 43
    raw = base64.urlsafe_b64decode(token[4:] + "=")
    assert len(raw) == 32
    assert create_token(store, FQDN, 600, NOW) != token


def test_only_the_hash_is_stored(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    with SQLiteStore(db) as store:
        token = create_token(store, "N1.cy.example.", 600, NOW)
        record = store.get_token(hashlib.sha256(token.encode()).digest())
        assert record is not None
        assert record.fqdn == FQDN
        assert record.expires_at == NOW + 600
        assert record.used_at is None
    for path in tmp_path.iterdir():  # the database and any -wal/-shm left behind
        assert token.encode() not in path.read_bytes()
    conn = sqlite3.connect(db)
    values = [v for row in conn.execute("SELECT * FROM tokens") for v in row]
    conn.close()
    assert token not in values and token.encode() not in values


def test_consume_once(store: SQLiteStore) -> None:
    token = create_token(store, FQDN, 600, NOW)
    consume_token(store, token, FQDN, NOW + 1)
    with pytest.raises(TokenError, match="already used") as info:
        consume_token(store, token, FQDN, NOW + 2)
    assert info.value.code == "token_used"
    record = store.get_token(hash_token(token))
    assert record is not None and record.used_at == NOW + 1


def test_unknown_token(store: SQLiteStore) -> None:
    with pytest.raises(TokenError, match="not known") as info:
        consume_token(store, "A" * 43, FQDN, NOW)
    assert info.value.code == "token_unknown"
    with pytest.raises(TokenError, match="not known"):
        consume_token(store, "", FQDN, NOW)
    with pytest.raises(TokenError, match="not known"):
        consume_token(store, "x" * 10000, FQDN, NOW)


def test_expired_token(store: SQLiteStore) -> None:
    token = create_token(store, FQDN, 60, NOW)
    with pytest.raises(TokenError, match="expired at") as info:
        consume_token(store, token, FQDN, NOW + 60)
    assert info.value.code == "token_expired"
    consume_token(store, token, FQDN, NOW + 59.9)


def test_token_bound_to_another_fqdn_is_not_burnt(store: SQLiteStore) -> None:
    token = create_token(store, FQDN, 600, NOW)
    wrong = r"created for n1\.cy\.example, not n2\.cy\.example"
    with pytest.raises(TokenError, match=wrong) as info:
        consume_token(store, token, "n2.cy.example", NOW)
    assert info.value.code == "token_wrong_fqdn"
    consume_token(store, token, "N1.cy.example", NOW)


def test_check_token_does_not_consume(store: SQLiteStore) -> None:
    token = create_token(store, FQDN, 600, NOW)
    check_token(store, token, FQDN, NOW)
    check_token(store, token, FQDN, NOW)
    consume_token(store, token, FQDN, NOW)


def test_surrounding_whitespace_is_forgiven(store: SQLiteStore) -> None:
    token = create_token(store, FQDN, 600, NOW)
    consume_token(store, f"  {token}\n", FQDN, NOW)


def test_token_errors_are_enrollment_errors() -> None:
    assert issubclass(TokenError, EnrollmentError)


def test_bad_parameters(store: SQLiteStore) -> None:
    with pytest.raises(EnrollmentError, match="positive"):
        create_token(store, FQDN, 0, NOW)
    with pytest.raises(EnrollmentError, match="bound to an FQDN"):
        create_token(store, "", 60, NOW)


def test_race_between_check_and_mark(store: SQLiteStore) -> None:
    """Two enrollments that both passed the check: only one may mark the token."""
    token = create_token(store, FQDN, 600, NOW)
    record = check_token(store, token, FQDN, NOW)
    assert store.mark_token_used(record.token_hash, NOW)
    with pytest.raises(TokenError, match="already used"):
        consume_token(store, token, FQDN, NOW)


def test_concurrent_consumers_in_separate_connections(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    with SQLiteStore(db) as store:
        token = create_token(store, FQDN, 600, NOW)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        with SQLiteStore(db) as own:
            barrier.wait()
            try:
                consume_token(own, token, FQDN, NOW)
                results.append("ok")
            except TokenError as exc:
                results.append(exc.code)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["token_used"] * 7
