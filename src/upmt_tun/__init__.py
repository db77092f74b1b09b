"""upmt_tun: Universal Per-application Mobility management using Tunnels.

A Mobile Host runs ``upmt-agent up``; an Anchor Node runs ``upmt-anchor``.
The pure cores (``tables``, ``nat``, ``policy``, ``dataplane.packet``,
``dataplane.forwarder``, ``signalling``) do no I/O; ``agent`` and ``anchor``
drive them with asyncio; ``system`` changes the host and undoes it.
"""

import logging

__all__ = ["__version__"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
