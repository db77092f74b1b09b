"""ICE (aioice) for direct MH<->FH and MH<->MH tunnels.

NOT IMPLEMENTED YET: the core issue only needs anchor tunnels. The tunnel
header keeps STUN distinguishable (first byte < 0x40) so ICE can later share
the tunnel sockets, as TRAPS.md requires (the NAT mapping belongs to the socket).
"""
