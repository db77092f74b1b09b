"""The one exception the host-changing layer raises."""


class SystemSetupError(Exception):
    """A host change (link, address, route, rule, sysctl, nftables) failed.

    The message is one line meant for the user; library tracebacks never escape.
    """
