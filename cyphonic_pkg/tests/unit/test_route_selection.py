from __future__ import annotations

import pytest

from cyphonic.nms.route_selection import NodeView, NoPath, RouteSelector
from cyphonic.wire.signaling import ErrorCode, Path, Reason


def view(node_id: int, addrs: tuple[str, ...], observed: tuple[str, ...]) -> NodeView:
    return NodeView.from_strings(node_id, addrs, 30000, observed)


A = view(
    1, ("198.51.100.20", "2001:db8:100::20"), ("198.51.100.20:30000", "[2001:db8:100::20]:30000")
)
B = view(
    2, ("198.51.100.30", "2001:db8:100::30"), ("198.51.100.30:30000", "[2001:db8:100::30]:30000")
)


def test_direct_prefers_ipv6() -> None:
    d = RouteSelector().select(A, B)
    assert (d.path, d.reason) == (Path.DIRECT, Reason.COMMON_FAMILY_PUBLIC)
    assert d.cn_endpoints == (("2001:db8:100::30", 30000),)
    assert d.mn_endpoints == (("2001:db8:100::20", 30000),)


def test_direct_over_ipv4_only() -> None:
    a4 = view(1, ("198.51.100.20",), ("198.51.100.20:30000",))
    d = RouteSelector().select(a4, B)
    assert d.cn_endpoints == (("198.51.100.30", 30000),)


def test_no_common_family() -> None:
    a4 = view(1, ("198.51.100.20",), ("198.51.100.20:30000",))
    b6 = view(2, ("2001:db8:100::30",), ("[2001:db8:100::30]:30000",))
    with pytest.raises(NoPath) as exc:
        RouteSelector().select(a4, b6)
    assert exc.value.code == ErrorCode.NO_PATH


def test_napt_detected() -> None:
    natted = view(1, ("10.0.0.5",), ("203.0.113.1:40001",))
    assert natted.behind_napt(4)
    assert not A.behind_napt(4)
