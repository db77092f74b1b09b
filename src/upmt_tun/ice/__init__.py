"""ICE for direct host-to-host tunnels (issue 11), as a pure core the agent drives.

Nothing in this package opens a socket or reads a clock: inputs are bytes, addresses and
``now``, outputs are typed actions. The agent's driver runs the checks on its own tunnel
sockets, because the NAT mapping a check opens belongs to the socket that sent it (aioice's
``Connection`` opens sockets of its own, so only its STUN codec and candidate helpers are
used here).

* :mod:`.demux`: ``is_stun``, the cheap test after the tunnel types on the shared port.
* :mod:`.candidates`: host and server-reflexive candidates of the tunnel sockets (the
  reflexive address is the one the anchor reports in ``TunnelSetupResp``).
* :mod:`.sdp`: the SDP body of the SIP rendezvous (ufrag, pwd, candidates, VIpA, key).
* :mod:`.checklist`: the per-peer ICE agent (pairs per socket, checks, nomination).

See DESIGN.md, *ICE (ice/)*, for what the driver must add around it.
"""
