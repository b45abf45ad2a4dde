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
    """Chooses the path; IPv6 is preferred when both sides have it."""

    families = (6, 4)

    def select(self, mn: NodeView, cn: NodeView) -> Decision:
        common = [f for f in self.families if f in mn.observed and f in cn.observed]
        if not common:
            raise NoPath(
                ErrorCode.NO_PATH,
                "no common address family between the nodes and no relay (TRS) available",
            )
        for family in common:
            if not mn.behind_napt(family) and not cn.behind_napt(family):
                return Decision(
                    Path.DIRECT,
                    Reason.COMMON_FAMILY_PUBLIC,
                    (mn.observed[family],),
                    (cn.observed[family],),
                )
        raise NoPath(
            ErrorCode.NO_PATH,
            "both families cross a NAPT; hole punching and relaying are not available yet",
        )
