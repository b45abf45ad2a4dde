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
    d = RouteSelector().select(a4, b6, relay_available=True)
    assert (d.path, d.reason) == (Path.RELAYED, Reason.NO_COMMON_FAMILY)


NAT_A = view(3, ("10.10.1.10",), ("203.0.113.1:30000",))
NAT_A2 = view(4, ("10.10.1.11",), ("203.0.113.1:30001",))
NAT_B = view(5, ("10.10.2.10",), ("203.0.113.2:30000",))
PUB4 = view(6, ("198.51.100.40",), ("198.51.100.40:30000",))


@pytest.mark.parametrize(
    ("mn", "cn", "path", "reason", "mn_ep", "cn_ep"),
    [
        (NAT_A, PUB4, Path.DIRECT, Reason.MN_BEHIND_NAPT, "203.0.113.1", "198.51.100.40"),
        (PUB4, NAT_A, Path.PUNCHED, Reason.CN_BEHIND_NAPT, "198.51.100.40", "203.0.113.1"),
        (NAT_A, NAT_B, Path.PUNCHED, Reason.BOTH_BEHIND_NAPT, "203.0.113.1", "203.0.113.2"),
        (NAT_A, NAT_A2, Path.LOCAL, Reason.SAME_NAPT, "10.10.1.10", "10.10.1.11"),
    ],
)
def test_decision_table(
    mn: NodeView, cn: NodeView, path: Path, reason: Reason, mn_ep: str, cn_ep: str
) -> None:
    d = RouteSelector().select(mn, cn)
    assert (d.path, d.reason) == (path, reason)
    assert d.mn_endpoints[0][0] == mn_ep and d.cn_endpoints[0][0] == cn_ep


def test_public_ipv6_beats_natted_ipv4() -> None:
    a = view(1, ("10.10.1.10", "2001:db8:1::10"), ("203.0.113.1:30000", "[2001:db8:1::10]:30000"))
    b = view(2, ("10.10.2.10", "2001:db8:2::10"), ("203.0.113.2:30000", "[2001:db8:2::10]:30000"))
    d = RouteSelector().select(a, b)
    assert d.path == Path.DIRECT and d.cn_endpoints == (("2001:db8:2::10", 30000),)


def test_napt_detected() -> None:
    natted = view(1, ("10.0.0.5",), ("203.0.113.1:40001",))
    assert natted.behind_napt(4)
    assert not A.behind_napt(4)
