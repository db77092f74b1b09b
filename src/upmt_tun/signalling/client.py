"""The agent's SIP user agent client: one MESSAGE transaction at a time per caller.

Requests go out on a given path socket (so the anchor learns that access
network's NATed address) and are retransmitted on Timer E until Timer F
(``sip.retransmit_schedule``); responses are matched by Via branch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from . import sip, upmt

__all__ = ["SipClient", "SipError", "Answer"]

log = logging.getLogger(__name__)

Answer = tuple[int, str, list[tuple[str, dict[str, Any]]]]


class Path(Protocol):
    """What a request goes out on: a path socket's address and immediate send."""

    local: tuple[str, int]

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None: ...


class SipError(Exception):
    """No usable answer: timeout, or a response whose body is unusable."""


class SipClient:
    def __init__(self, user: str) -> None:
        self.user = user
        self.pending: dict[str, asyncio.Future[sip.SipResponse]] = {}
        self.cseq = 0
        self.stats = {"requests": 0, "retransmits": 0, "timeouts": 0, "stray": 0, "malformed": 0}

    async def request(self, path: Path, dest: tuple[str, int],
                      signals: list[tuple[str, dict[str, Any]]], timeout: float) -> Answer:
        """Send one MESSAGE through ``path`` and wait for its final response."""
        return (await self.request_timed(path, dest, signals, timeout))[0]

    async def request_timed(self, path: Path, dest: tuple[str, int],
                            signals: list[tuple[str, dict[str, Any]]],
                            timeout: float) -> tuple[Answer, float]:
        """As :meth:`request`, also returning the round-trip time (s) of the answered send."""
        self.cseq += 1
        branch = sip.BRANCH_MAGIC + sip.new_token()
        data = sip.build_request(target=dest, from_user=self.user, via=path.local,
                                 call_id=sip.new_token(), cseq=self.cseq, branch=branch,
                                 body=upmt.encode(signals))
        fut: asyncio.Future[sip.SipResponse] = asyncio.get_running_loop().create_future()
        self.pending[branch] = fut
        self.stats["requests"] += 1
        loop = asyncio.get_running_loop()
        try:
            for i, delay in enumerate(sip.retransmit_schedule(timeout)):
                if i:
                    self.stats["retransmits"] += 1
                sent = loop.time()
                path.sendto(data, dest)
                try:
                    resp = await asyncio.wait_for(asyncio.shield(fut), delay)
                    rtt = loop.time() - sent
                    break
                except TimeoutError:
                    continue
            else:  # every wait timed out
                resp = None
            if resp is None or not fut.done():
                self.stats["timeouts"] += 1
                raise SipError(f"no answer from {dest[0]}:{dest[1]} within {timeout:g} s")
        finally:
            self.pending.pop(branch, None)
            if not fut.done():
                fut.cancel()
        body: list[tuple[str, dict[str, Any]]] = []
        if resp.status_code == 200:
            try:
                body = upmt.decode(resp.body)
            except ValueError as e:
                raise SipError(f"unusable answer from {dest[0]}:{dest[1]}: {e}") from None
        return (resp.status_code, resp.reason_phrase, body), rtt

    def on_datagram(self, data: bytes) -> None:
        """Feed a datagram classified as SIP; responses complete their transaction."""
        try:
            msg = sip.parse(data)
        except sip.MalformedSip:
            self.stats["malformed"] += 1
            return
        if not isinstance(msg, sip.SipResponse) or msg.status_code < 200:
            self.stats["stray"] += 1   # we serve no requests; provisional answers ignored
            return
        key = sip.transaction_key(msg)
        fut = self.pending.get(key[0]) if key else None
        if fut is None or fut.done():
            self.stats["stray"] += 1
            return
        fut.set_result(msg)
