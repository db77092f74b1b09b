# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled hot path: the per-byte work of offload.py, with identical results.

offload.py holds the reference (pure Python) versions and the documentation; the tests
run both on the same inputs. Only plain C over byte buffers here: no allocation but the
output packets, no Python objects in the loops.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset


cdef inline uint64_t _sum(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Sum of big-endian 16-bit words (odd tail padded with zero), not folded."""
    cdef uint64_t s = 0
    cdef Py_ssize_t i = 0
    while i + 1 < n:
        s += (<uint32_t>p[i] << 8) | p[i + 1]
        i += 2
    if i < n:
        s += <uint32_t>p[i] << 8
    return s


cdef inline uint32_t _fold(uint64_t s) noexcept nogil:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return <uint32_t>s


cdef inline void _put16(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


def finish_csum(bytearray pkt, Py_ssize_t csum_start, Py_ssize_t csum_offset):
    """See offload.py_finish_csum."""
    cdef Py_ssize_t n = len(pkt)
    cdef Py_ssize_t at = csum_start + csum_offset
    if csum_start < 20 or at + 2 > n:
        return False
    cdef uint8_t* p = <uint8_t*><char*>pkt
    cdef uint32_t c = _fold(_sum(p + csum_start, n - csum_start)) ^ 0xFFFF
    if c == 0 and p[9] == 17:
        c = 0xFFFF
    _put16(p + at, c)
    return True


def tso_split(const uint8_t[:] pkt, Py_ssize_t gso_size):
    """See offload.py_tso_split."""
    cdef Py_ssize_t n = pkt.shape[0]
    if n < 40 or gso_size <= 0:
        return []
    cdef const uint8_t* src = &pkt[0]
    if src[0] >> 4 != 4 or src[9] != 6:
        return []
    cdef Py_ssize_t ihl = (src[0] & 15) * 4
    if ihl < 20 or ihl + 20 > n:
        return []
    cdef Py_ssize_t thl = (src[ihl + 12] >> 4) * 4
    cdef Py_ssize_t hlen = ihl + thl
    if thl < 20 or hlen > n:
        return []
    cdef uint32_t ident = (<uint32_t>src[4] << 8) | src[5]
    cdef uint32_t seq = ((<uint32_t>src[ihl + 4] << 24) | (<uint32_t>src[ihl + 5] << 16)
                         | (<uint32_t>src[ihl + 6] << 8) | src[ihl + 7])
    cdef uint8_t flags = src[ihl + 13]
    cdef uint64_t pseudo_base = _sum(src + 12, 8) + 6
    cdef Py_ssize_t payload_len = n - hlen
    cdef Py_ssize_t offset = 0, size, total
    cdef uint32_t i = 0
    cdef bint last
    cdef uint8_t f
    cdef bytes seg
    cdef uint8_t* d
    out = []
    while True:
        size = gso_size if gso_size < payload_len - offset else payload_len - offset
        last = offset + size >= payload_len
        total = hlen + size
        seg = PyBytes_FromStringAndSize(NULL, total)
        d = <uint8_t*>PyBytes_AS_STRING(seg)
        memcpy(d, src, hlen)
        memcpy(d + hlen, src + hlen + offset, size)
        _put16(d + 2, <uint32_t>total)
        _put16(d + 4, (ident + i) & 0xFFFF)
        d[10] = 0
        d[11] = 0
        _put16(d + 10, _fold(_sum(d, ihl)) ^ 0xFFFF)
        _put16(d + ihl + 4, ((seq + <uint32_t>offset) >> 16) & 0xFFFF)
        _put16(d + ihl + 6, (seq + <uint32_t>offset) & 0xFFFF)
        f = flags
        if not last:
            f &= ~(0x01 | 0x08)
        if i:
            f &= ~0x80
        d[ihl + 13] = f
        d[ihl + 16] = 0
        d[ihl + 17] = 0
        _put16(d + ihl + 16,
               _fold(pseudo_base + <uint64_t>(total - ihl) + _sum(d + ihl, total - ihl)) ^ 0xFFFF)
        out.append(seg)
        offset += size
        i += 1
        if last:
            return out


# -- internal NAT, the common case (nat.py has the reference and the full story) -----------

cdef inline uint32_t _rd16(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t _adj(uint32_t ck, uint32_t d) noexcept nogil:
    """RFC 1624 eqn. 3 with a precomputed address difference ``d`` (see nat.py)."""
    cdef uint32_t s = ck ^ 0xFFFF
    if s == 0:
        s = 0xFFFF
    s += d
    return ((s & 0xFFFF) + (s >> 16)) ^ 0xFFFF


def rewrite_addr(bytearray pkt, const uint8_t[:] new, bint is_src):
    """Rewrite IP.src (``is_src``) or IP.dst of an unfragmented-or-first-fragment IPv4
    TCP/UDP packet (or any non-first fragment) in place: 1 done, 0 malformed (untouched),
    -1 ICMP or other protocol with an L4 header to fix (the caller runs nat.py's code)."""
    if new.shape[0] != 4:
        raise ValueError(f"an IPv4 address is 4 bytes, got {new.shape[0]}")
    cdef Py_ssize_t size = len(pkt)
    if size < 20:
        return 0
    cdef uint8_t* p = <uint8_t*><char*>pkt
    cdef Py_ssize_t hlen = (p[0] & 0x0F) << 2
    cdef Py_ssize_t total = _rd16(p + 2)
    if p[0] >> 4 != 4 or hlen < 20 or hlen > size or total > size or total < hlen:
        return 0
    cdef uint8_t proto = p[9]
    cdef bint first = (_rd16(p + 6) & 0x1FFF) == 0
    if first and proto == 1:
        return -1
    cdef uint8_t* a = p + (12 if is_src else 16)
    cdef uint32_t old = (<uint32_t>a[0] << 24) | (<uint32_t>a[1] << 16) | (<uint32_t>a[2] << 8) | a[3]
    cdef uint32_t addr = (<uint32_t>new[0] << 24) | (<uint32_t>new[1] << 16) | (<uint32_t>new[2] << 8) | new[3]
    if old == addr:
        return 1
    cdef uint64_t d64 = (<uint64_t>(old ^ 0xFFFFFFFF) + addr) % 0xFFFF
    cdef uint32_t d = <uint32_t>d64
    _put16(p + 10, _adj(_rd16(p + 10), d))
    a[0] = new[0]
    a[1] = new[1]
    a[2] = new[2]
    a[3] = new[3]
    cdef Py_ssize_t at
    cdef uint32_t c
    if not first:
        return 1
    if proto == 6:
        at = hlen + 16
        if at + 2 <= total:
            _put16(p + at, _adj(_rd16(p + at), d))
    elif proto == 17:
        at = hlen + 6
        if at + 2 <= total:
            c = _rd16(p + at)
            if c:
                c = _adj(c, d)
                _put16(p + at, c if c else 0xFFFF)
    return 1


def five_tuple_tcpudp(const uint8_t[:] pkt):
    """(proto, src, dst, sport, dport) of a well-formed unfragmented IPv4 TCP/UDP packet
    with its ports inside; None for anything else (the caller runs nat.py's code)."""
    cdef Py_ssize_t size = pkt.shape[0]
    if size < 24:
        return None
    cdef const uint8_t* p = &pkt[0]
    cdef Py_ssize_t hlen = (p[0] & 0x0F) << 2
    cdef Py_ssize_t total = _rd16(p + 2)
    cdef uint8_t proto = p[9]
    if (p[0] >> 4 != 4 or hlen < 20 or hlen > size or total > size or total < hlen
            or (proto != 6 and proto != 17) or (_rd16(p + 6) & 0x1FFF) or hlen + 4 > total):
        return None
    return (proto, PyBytes_FromStringAndSize(<const char*>p + 12, 4),
            PyBytes_FromStringAndSize(<const char*>p + 16, 4),
            _rd16(p + hlen), _rd16(p + hlen + 2))


# -- GRO towards the TUN (offload.py_coalesce is the reference) ----------------------------

cdef inline Py_ssize_t _mergeable(bytes pb) noexcept:
    cdef Py_ssize_t n = len(pb)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(pb)
    if n < 41 or p[0] != 0x45 or p[9] != 6 or (p[6] & 0x3F) or p[7]:
        return 0
    if _rd16(p + 2) != n:
        return 0
    cdef Py_ssize_t hl = 20 + (p[32] >> 4) * 4
    cdef uint8_t flags = p[33]
    if hl < 40 or hl >= n or not (flags & 0x10) or (flags & 0xE7):
        return 0
    return hl


cdef inline uint32_t _rd32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


def coalesce(list pkts):
    """See offload.py_coalesce (same bytes out)."""
    cdef list out = []
    cdef Py_ssize_t i = 0, j, k, n = len(pkts), hl, size, qs, total, off
    cdef uint32_t nxt
    cdef bytes p, q, last, res
    cdef const uint8_t* pp
    cdef const uint8_t* qp
    cdef uint8_t* d
    cdef uint8_t lastflags
    while i < n:
        p = pkts[i]
        hl = _mergeable(p)
        j = i + 1
        total = len(p)
        size = 0
        lastflags = 0
        if hl:
            pp = <const uint8_t*>PyBytes_AS_STRING(p)
            size = total - hl
            nxt = _rd32(pp + 24) + <uint32_t>size
            lastflags = pp[33]
            while j < n and not (lastflags & 0x08):
                q = pkts[j]
                qs = len(q) - hl
                if _mergeable(q) != hl or qs > size or total + qs > 65535:
                    break
                qp = <const uint8_t*>PyBytes_AS_STRING(q)
                if (memcmp(qp + 12, pp + 12, 12) != 0 or memcmp(qp + 28, pp + 28, 4) != 0
                        or memcmp(qp + 34, pp + 34, 2) != 0
                        or memcmp(qp + 40, pp + 40, hl - 40) != 0 or _rd32(qp + 24) != nxt):
                    break
                total += qs
                nxt += <uint32_t>qs
                lastflags = qp[33]
                j += 1
                if qs < size:
                    break
        if j - i == 1:
            res = PyBytes_FromStringAndSize(NULL, 10 + len(p))
            d = <uint8_t*>PyBytes_AS_STRING(res)
            memset(d, 0, 10)
            memcpy(d + 10, PyBytes_AS_STRING(p), len(p))
            out.append(res)
            i = j
            continue
        res = PyBytes_FromStringAndSize(NULL, 10 + total)
        d = <uint8_t*>PyBytes_AS_STRING(res)
        # virtio_net_hdr, native byte order (x86: little-endian, as struct "=")
        d[0] = 1
        d[1] = 1
        (<unsigned short*>(d + 2))[0] = <unsigned short>hl
        (<unsigned short*>(d + 4))[0] = <unsigned short>size
        (<unsigned short*>(d + 6))[0] = 20
        (<unsigned short*>(d + 8))[0] = 16
        memcpy(d + 10, pp, hl)
        off = 10 + hl
        for k in range(i, j):
            q = pkts[k]
            memcpy(d + off, PyBytes_AS_STRING(q) + hl, len(q) - hl)
            off += len(q) - hl
        _put16(d + 12, <uint32_t>total)
        d[20] = 0
        d[21] = 0
        _put16(d + 20, _fold(_sum(d + 10, 20)) ^ 0xFFFF)
        d[43] |= lastflags & 0x08
        _put16(d + 46, _fold(_sum(d + 22, 8) + 6 + <uint64_t>(total - 20)))
        out.append(res)
        i = j
    return out


# -- the anchor's packed flow key (flowtable.py_flow_key is the reference) -----------------

cdef extern from *:
    """
    /* the 13 big-endian bytes src|proto|dst|sport|dport as one int, in one allocation */
    static PyObject *upmt_key_from_be(const unsigned char *b, size_t n) {
    #if PY_VERSION_HEX >= 0x030D0000
        return PyLong_FromUnsignedNativeBytes(b, (Py_ssize_t)n, Py_ASNATIVEBYTES_BIG_ENDIAN);
    #else
        return _PyLong_FromByteArray(b, n, 0, 0);
    #endif
    }
    """
    object upmt_key_from_be(const unsigned char *b, size_t n)


cdef inline object _packed_key(const uint8_t* p, Py_ssize_t hlen, bint reverse):
    """flowtable.pack_key of the IPv4 TCP/UDP packet at ``p`` (checked by the caller)."""
    cdef uint8_t k[13]
    if reverse:
        memcpy(k, p + 16, 4)
        memcpy(k + 5, p + 12, 4)
        memcpy(k + 9, p + hlen + 2, 2)
        memcpy(k + 11, p + hlen, 2)
    else:
        memcpy(k, p + 12, 4)
        memcpy(k + 5, p + 16, 4)
        memcpy(k + 9, p + hlen, 4)
    k[4] = p[9]
    return upmt_key_from_be(k, 13)


cdef inline bint _tcpudp(const uint8_t* p, Py_ssize_t size) noexcept:
    """A well-formed unfragmented IPv4 TCP/UDP packet with its ports inside (size >= 24)."""
    cdef Py_ssize_t hlen = (p[0] & 0x0F) << 2
    cdef Py_ssize_t total = _rd16(p + 2)
    return not (p[0] >> 4 != 4 or hlen < 20 or hlen > size or total > size or total < hlen
                or (p[9] != 6 and p[9] != 17) or (_rd16(p + 6) & 0x1FFF) or hlen + 4 > total)


def flow_key_tcpudp(const uint8_t[:] pkt, bint reverse):
    """flowtable.pack_key of the 5-tuple of a well-formed unfragmented IPv4 TCP/UDP packet
    with its ports inside (``reverse``: of the reversed 5-tuple, a downlink packet's
    uplink key); None for anything else (the caller runs flowtable.py's code)."""
    cdef Py_ssize_t size = pkt.shape[0]
    if size < 24 or not _tcpudp(&pkt[0], size):
        return None
    return _packed_key(&pkt[0], (pkt[0] & 0x0F) << 2, reverse)


def uplink_key_tcpudp(const uint8_t[:] pkt, bytes src):
    """flowtable.py_uplink_key for a well-formed unfragmented IPv4 TCP/UDP packet with its
    ports inside: its packed key if it comes from ``src`` (4 bytes), 0 if it does not;
    None for anything else (the caller runs flowtable.py's code)."""
    if len(src) != 4:
        raise ValueError(f"an IPv4 address is 4 bytes, got {len(src)}")
    cdef Py_ssize_t size = pkt.shape[0]
    if size < 24 or not _tcpudp(&pkt[0], size):
        return None
    if memcmp(&pkt[12], PyBytes_AS_STRING(src), 4) != 0:
        return 0
    return _packed_key(&pkt[0], (pkt[0] & 0x0F) << 2, False)
