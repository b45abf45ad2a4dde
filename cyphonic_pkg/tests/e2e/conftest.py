"""Guards for the end-to-end tests: they must not change the host they run on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

RESOLV = Path("/etc/resolv.conf")


@pytest.fixture(autouse=True, scope="session")
def host_resolv_conf_untouched() -> Iterator[None]:
    """DHCP clients in the test namespaces write resolv.conf; `ip netns exec` redirects that
    to /etc/netns/<ns>/resolv.conf only when that file exists.  If a test ever forgets, the
    host's resolver would be replaced: restore it and fail loudly."""
    try:
        before = RESOLV.read_bytes()
    except OSError:
        yield
        return
    yield
    after = RESOLV.read_bytes()
    if after != before:
        RESOLV.write_bytes(before)
        pytest.fail(f"a test changed the host's {RESOLV} (restored): {after[:200]!r}")
