"""The exceptions the host-changing layer and start-up raise (kept light: the CLI imports
this module for every command)."""


class SystemSetupError(Exception):
    """A host change (link, address, route, rule, sysctl, nftables) failed.

    The message is one line meant for the user; library tracebacks never escape.
    """


class StartupError(Exception):
    """One line for the user (exit code 1)."""
