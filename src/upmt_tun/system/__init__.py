"""Everything that changes the host (pyroute2, nft, sysctl, ctnetlink) and undoes it."""

from upmt_tun.system.errors import SystemSetupError

__all__ = ["SystemSetupError"]
