"""Attacker-side helpers for tests/test_netns_attacks.py.

The scripts run as separate processes inside a network namespace
(``python tests/attack/tool.py ...``; they put the repository on sys.path themselves):

* :mod:`pcap`        -- a tiny pcap reader (UDP payloads out of a tcpdump capture);
* :mod:`rawsock`     -- IPv4/UDP/TCP builders and a raw (IP_HDRINCL) sender with any source;
* :mod:`tool`        -- the off-path attacker: forge, replay (optionally spoofed), flood;
* :mod:`evil_client` -- a malicious host whose key *is* a [[peer]] of the anchor;
* :mod:`sink`        -- a UDP sink that records what a correspondent receives;
* :mod:`http_server` -- a paced HTTP file server (downloads that really last);
* :mod:`udp_stream`  -- a victim's UDP stream with sequence numbers.
"""
