"""Route selection: how should the MN reach the CN?  (pure logic)

Input: what each node registered (its real addresses) and what NMS observed
(the source address/port of its signaling per address family).  A node whose
observed address is not one of its real addresses sits behind a NAPT.

Decision table (issue 2 rows marked with *; the rest arrive with TRS):

==========================================  ========  =====================
situation                                    path      reason
==========================================  ========  =====================
* common family, neither behind NAPT         DIRECT    COMMON_FAMILY_PUBLIC
  only the CN behind NAPT                    PUNCHED   CN_BEHIND_NAPT
  both behind NAPT                           PUNCHED   BOTH_BEHIND_NAPT
  behind the same NAPT                       LOCAL     SAME_NAPT
  no common family                           RELAYED   NO_COMMON_FAMILY
==========================================  ========  =====================
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cyphonic.wire.signaling import Endpoint, ErrorCode, Path, Reason, parse_endpoint


@dataclass(frozen=True)
class NodeView:
    """What NMS knows of one registered node, per address family."""

    node_id: int
    addresses: tuple[str, ...]
    port: int
    observed: dict[int, Endpoint]  # family (4 or 6) -> observed endpoint

    @classmethod
    def from_strings(
        cls, node_id: int, addresses: tuple[str, ...], port: int, observed: tuple[str, ...]
    ) -> NodeView:
        obs: dict[int, Endpoint] = {}
        for text in observed:
            ep = parse_endpoint(text)
            obs[ipaddress.ip_address(ep[0]).version] = ep
        return cls(node_id, addresses, port, obs)

    def behind_napt(self, family: int) -> bool:
        ep = self.observed.get(family)
        return ep is not None and (ep[0] not in self.addresses or ep[1] != self.port)


@dataclass(frozen=True)
class Decision:
    path: Path
    reason: Reason
    mn_endpoints: tuple[Endpoint, ...]  # where the CN reaches the MN
    cn_endpoints: tuple[Endpoint, ...]  # where the MN reaches the CN


class NoPath(Exception):
    """No usable path between the two nodes; carries the NMS error code."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code


class RouteSelector:
    """Chooses the path; IPv6 is preferred when both sides have it.

    ``relay_available`` says whether a TRS is registered; without one the
    relayed rows raise ``NoPath``.
    """

    families = (6, 4)

    def select(self, mn: NodeView, cn: NodeView, relay_available: bool = False) -> Decision:
        common = [f for f in self.families if f in mn.observed and f in cn.observed]
        if not common:
            if relay_available:
                return Decision(Path.RELAYED, Reason.NO_COMMON_FAMILY, (), ())
            raise NoPath(
                ErrorCode.NO_PATH,
                "no common address family between the nodes and no relay (TRS) available",
            )
        # 1. a family where neither side is behind NAPT, else 2. where only the MN is
        for family in common:
            if not mn.behind_napt(family) and not cn.behind_napt(family):
                return self._decide(Path.DIRECT, Reason.COMMON_FAMILY_PUBLIC, mn, cn, family)
        for family in common:
            if not cn.behind_napt(family):
                # the MN's own packets open its NAPT mapping: a plain direct path
                return self._decide(Path.DIRECT, Reason.MN_BEHIND_NAPT, mn, cn, family)
        family = common[0]
        mn_ep, cn_ep = mn.observed[family], cn.observed[family]
        if mn.behind_napt(family) and mn_ep[0] == cn_ep[0]:
            # same public address: behind the same NAPT, use the local addresses
            mn_local = _local(mn, family)
            cn_local = _local(cn, family)
            if mn_local and cn_local:
                return Decision(Path.LOCAL, Reason.SAME_NAPT, (mn_local,), (cn_local,))
        if not mn.behind_napt(family):
            return self._decide(Path.PUNCHED, Reason.CN_BEHIND_NAPT, mn, cn, family)
        return self._decide(Path.PUNCHED, Reason.BOTH_BEHIND_NAPT, mn, cn, family)

    @staticmethod
    def _decide(path: Path, reason: Reason, mn: NodeView, cn: NodeView, family: int) -> Decision:
        return Decision(path, reason, (mn.observed[family],), (cn.observed[family],))


def _local(view: NodeView, family: int) -> Endpoint | None:
    for addr in view.addresses:
        if ipaddress.ip_address(addr).version == family:
            return (addr, view.port)
    return None
