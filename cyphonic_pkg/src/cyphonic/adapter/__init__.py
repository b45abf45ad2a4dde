"""The CYPHONIC adapter: gives unmodified general nodes (GNs) on its downlink a CYPHONIC identity.

Each general node is known in advance by its MAC address (from AS, slide 15 of the GCCE 2022
paper) and gets a fixed VIPv4/VIPv6 and FQDN.  The adapter configures it (DHCPv4, or Router
Advertisements + stateful DHCPv6), is its router and DNS server, answers ARP and Neighbor
Solicitations for peer VIPs with its own MAC (ARP/ND proxy) and carries its packets through the
overlay.

Modules (pure cores drive everything; only :mod:`~cyphonic.adapter.packet_io` touches sockets):

* :mod:`~cyphonic.adapter.gn` -- the general-node table and the downlink's addressing plan,
  shared by every service below;
* :mod:`~cyphonic.adapter.leases` -- the persistent lease store (DHCPv4 and DHCPv6);
* :mod:`~cyphonic.adapter.dhcpv4` -- DHCPv4 server (RFC 2131/2132);
* :mod:`~cyphonic.adapter.arp_proxy` -- ARP proxy for peer VIPv4s (RFC 826, RFC 1027);
* :mod:`~cyphonic.adapter.nd_proxy`, :mod:`~cyphonic.adapter.router_advertisement` -- the IPv6
  counterparts;
* :mod:`~cyphonic.adapter.packet_io` -- AF_PACKET sockets on the downlink and the asyncio glue.
"""
