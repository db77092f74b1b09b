# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled hot path: the per-byte work of offload.py, with identical results.

offload.py holds the reference (pure Python) versions and the documentation; the tests
run both on the same inputs. Only plain C over byte buffers here: no allocation but the
output packets, no Python objects in the loops.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset


cdef uint16_t _one = 1
cdef bint _LE = (<uint8_t*>&_one)[0] == 1     # little-endian host


cdef inline uint64_t _sum(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """The one's complement sum of ``p`` as big-endian 16-bit words (odd tail padded with
    zero), as a value in [1, 0xFFFF] (0 only for all-zero data): add more sums to it,
    then :func:`_fold`. Read 8 bytes at a time in host order; the sum of host-order
    words is the byte swap of the big-endian one (RFC 1071, 2.(B))."""
    cdef uint64_t s = 0, w
    cdef uint16_t h
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        s += <uint32_t>w
        s += w >> 32
        i += 8
    while i + 2 <= n:
        memcpy(&h, p + i, 2)
        s += h
        i += 2
    if i < n:
        s += p[i] if _LE else (<uint32_t>p[i] << 8)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    if _LE:
        s = ((s & 0xFF) << 8) | (s >> 8)
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
    if c == 0 and (p[9] == 17 if p[0] >> 4 != 6 else csum_offset == 6):
        c = 0xFFFF
    _put16(p + at, c)
    return True


def tso_split(const uint8_t[:] pkt, Py_ssize_t gso_size, const uint8_t[:] new_src=None):
    """See offload.py_tso_split: one routine for both families, which differ only in the
    IP header (its length, where the addresses and the length field sit, IPv4's id and
    header checksum)."""
    cdef Py_ssize_t n = pkt.shape[0]
    cdef bint six = n > 0 and pkt[0] >> 4 == 6
    cdef Py_ssize_t alen = 16 if six else 4            # one address
    if new_src is not None and new_src.shape[0] != alen:
        raise ValueError(f"an IPv{6 if six else 4} address is {alen} bytes, "
                         f"got {new_src.shape[0]}")
    cdef Py_ssize_t ihl, at = 8 if six else 12          # where the addresses sit
    if six:
        if n < 60 or gso_size <= 0 or pkt[6] != 6:
            return []
        ihl = 40
    else:
        if n < 40 or gso_size <= 0 or pkt[0] >> 4 != 4 or pkt[9] != 6:
            return []
        ihl = (pkt[0] & 15) * 4
        if ihl < 20 or ihl + 20 > n:
            return []
    cdef const uint8_t* src = &pkt[0]
    cdef uint8_t addrs[32]
    memcpy(addrs, src + at, 2 * alen)
    if new_src is not None:
        memcpy(addrs, &new_src[0], alen)
    cdef Py_ssize_t thl = (src[ihl + 12] >> 4) * 4
    cdef Py_ssize_t hlen = ihl + thl
    if thl < 20 or hlen > n:
        return []
    cdef uint32_t ident = 0 if six else (<uint32_t>src[4] << 8) | src[5]
    cdef uint32_t seq = ((<uint32_t>src[ihl + 4] << 24) | (<uint32_t>src[ihl + 5] << 16)
                         | (<uint32_t>src[ihl + 6] << 8) | src[ihl + 7])
    cdef uint8_t flags = src[ihl + 13]
    cdef uint64_t pseudo_base = _sum(addrs, 2 * alen) + 6
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
        memcpy(d + at, addrs, 2 * alen)
        memcpy(d + hlen, src + hlen + offset, size)
        if six:
            _put16(d + 4, <uint32_t>(total - 40))
        else:
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


# -- AES-256-GCM on OpenSSL's EVP interface, one context per key -----------------------
# cryptography's AESGCM sets up a new cipher context (key schedule, GHASH tables) on every
# call: ~0.9 us of a 1400-byte seal. The system's libcrypto, loaded here at import with
# dlopen (no headers or link-time dependency: without it, Session keeps cryptography's
# AESGCM), keeps one context per key and only sets the nonce per packet. Same algorithm,
# same bytes: the tests compare both.
#
# On OpenSSL 3 every EVP call is a trip through the EVP layer to the provider that holds
# the cipher: EVP_CipherInit_ex asks the provider for the IV length (an OSSL_PARAM round
# trip) before it sets the nonce, EVP_CIPHER_CTX_ctrl turns the tag into an OSSL_PARAM
# array, each found again by name with strcmp: ~16 % of the instructions of a 1400-byte
# seal+open (callgrind, OpenSSL 3.0). So when libcrypto has the OpenSSL 3 provider API,
# Aead calls the provider's cipher functions itself: the ones EVP would call, with the
# arguments EVP would pass (OSSL_FUNC_cipher_* in openssl/core_dispatch.h). What remains
# is the provider's own parameter handling for the tag. Anything missing or odd (OpenSSL
# 1.1 has no providers; a provider that does not give the EVP calls' bytes in the check
# at import, _choose_path) keeps the EVP calls; so does UPMT_AEAD=evp.

from posix.dlfcn cimport RTLD_LOCAL, RTLD_NOW, dlopen, dlsym

import os

from cryptography.exceptions import InvalidTag

ctypedef void* (*_ctx_new_t)() noexcept nogil
ctypedef void (*_ctx_free_t)(void*) noexcept nogil
ctypedef const void* (*_cipher_t)() noexcept nogil
ctypedef int (*_init_t)(void*, const void*, void*, const uint8_t*, const uint8_t*, int) noexcept nogil
ctypedef int (*_update_t)(void*, uint8_t*, int*, const uint8_t*, int) noexcept nogil
ctypedef int (*_final_t)(void*, uint8_t*, int*) noexcept nogil
ctypedef int (*_ctrl_t)(void*, int, int, void*) noexcept nogil

cdef _ctx_new_t _ctx_new = NULL
cdef _ctx_free_t _ctx_free = NULL
cdef _cipher_t _aes_256_gcm = NULL
cdef _init_t _cipher_init = NULL
cdef _update_t _cipher_update = NULL
cdef _final_t _cipher_final = NULL
cdef _ctrl_t _ctrl = NULL
cdef enum:
    _GCM_GET_TAG = 0x10       # EVP_CTRL_AEAD_GET_TAG
    _GCM_SET_TAG = 0x11       # EVP_CTRL_AEAD_SET_TAG
    _TAG = 16

# The OpenSSL 3 core types (openssl/core.h), laid out as there.
ctypedef struct _Param:                  # OSSL_PARAM
    const char* key
    unsigned int data_type
    void* data
    size_t data_size
    size_t return_size

ctypedef struct _Dispatch:               # OSSL_DISPATCH
    int function_id
    void* function

ctypedef struct _Algorithm:              # OSSL_ALGORITHM
    const char* names
    const char* properties
    const _Dispatch* implementation
    const char* description

cdef enum:
    _OP_CIPHER = 2                       # OSSL_OP_CIPHER
    _F_NEWCTX = 1                        # OSSL_FUNC_CIPHER_*
    _F_ENCRYPT_INIT = 2
    _F_DECRYPT_INIT = 3
    _F_UPDATE = 4
    _F_FINAL = 5
    _F_FREECTX = 7
    _F_GET_CTX_PARAMS = 10
    _F_SET_CTX_PARAMS = 11
    _PARAM_OCTET_STRING = 5              # OSSL_PARAM_OCTET_STRING
cdef size_t _PARAM_UNMODIFIED = <size_t>-1   # OSSL_PARAM_UNMODIFIED
cdef const char* _PARAM_TAG = b"tag"         # OSSL_CIPHER_PARAM_AEAD_TAG

ctypedef void* (*_fetch_t)(void*, const char*, const char*) noexcept nogil
ctypedef const void* (*_get0_provider_t)(const void*) noexcept nogil
ctypedef void* (*_provider_ctx_t)(const void*) noexcept nogil
ctypedef const _Algorithm* (*_query_t)(const void*, int, int*) noexcept nogil
ctypedef void (*_unquery_t)(const void*, int, const _Algorithm*) noexcept nogil
ctypedef void (*_cipher_free_t)(void*) noexcept nogil

ctypedef void* (*_p_newctx_t)(void*) noexcept nogil
ctypedef int (*_p_init_t)(void*, const uint8_t*, size_t, const uint8_t*, size_t,
                          const _Param*) noexcept nogil
ctypedef int (*_p_update_t)(void*, uint8_t*, size_t*, size_t, const uint8_t*, size_t) noexcept nogil
ctypedef int (*_p_final_t)(void*, uint8_t*, size_t*, size_t) noexcept nogil
ctypedef void (*_p_freectx_t)(void*) noexcept nogil
ctypedef int (*_p_get_params_t)(void*, _Param*) noexcept nogil
ctypedef int (*_p_set_params_t)(void*, const _Param*) noexcept nogil

cdef void* _provctx = NULL
cdef _p_newctx_t _p_newctx = NULL
cdef _p_init_t _p_einit = NULL
cdef _p_init_t _p_dinit = NULL
cdef _p_update_t _p_update = NULL
cdef _p_final_t _p_final = NULL
cdef _p_freectx_t _p_freectx = NULL
cdef _p_get_params_t _p_get_params = NULL
cdef _p_set_params_t _p_set_params = NULL


cdef object _load_libcrypto():
    global _ctx_new, _ctx_free, _aes_256_gcm, _cipher_init, _cipher_update, _cipher_final, _ctrl
    cdef void* h
    cdef void* f[7]
    cdef int i
    names = (b"EVP_CIPHER_CTX_new", b"EVP_CIPHER_CTX_free", b"EVP_aes_256_gcm",
             b"EVP_CipherInit_ex", b"EVP_CipherUpdate", b"EVP_CipherFinal_ex",
             b"EVP_CIPHER_CTX_ctrl")
    for lib in (b"libcrypto.so.3", b"libcrypto.so.1.1", b"libcrypto.so"):
        h = dlopen(lib, RTLD_NOW | RTLD_LOCAL)
        if h == NULL:
            continue
        for i in range(7):
            f[i] = dlsym(h, names[i])
        if all(f[i] != NULL for i in range(7)):
            _ctx_new = <_ctx_new_t>f[0]
            _ctx_free = <_ctx_free_t>f[1]
            _aes_256_gcm = <_cipher_t>f[2]
            _cipher_init = <_init_t>f[3]
            _cipher_update = <_update_t>f[4]
            _cipher_final = <_final_t>f[5]
            _ctrl = <_ctrl_t>f[6]
            return lib.decode()
    return None


cdef bint _load_provider(bytes lib):
    """Find the cipher functions of the provider that EVP uses for AES-256-GCM (the one
    EVP_CIPHER_fetch picks with the default properties). True when all are there. The
    fetched EVP_CIPHER is kept for the life of the process: it holds the provider."""
    global _provctx, _p_newctx, _p_einit, _p_dinit, _p_update, _p_final, _p_freectx
    global _p_get_params, _p_set_params
    cdef void* h = dlopen(lib, RTLD_NOW | RTLD_LOCAL)
    cdef void* f[6]
    cdef void* fn[12]
    cdef int i, no_cache = 0
    cdef void* cipher
    cdef const void* prov
    cdef const _Algorithm* algs
    cdef const _Algorithm* a
    cdef const _Dispatch* d
    cdef bint found = False
    if h == NULL:
        return False
    names = (b"EVP_CIPHER_fetch", b"EVP_CIPHER_get0_provider",
             b"OSSL_PROVIDER_get0_provider_ctx", b"OSSL_PROVIDER_query_operation",
             b"OSSL_PROVIDER_unquery_operation", b"EVP_CIPHER_free")
    for i in range(6):
        f[i] = dlsym(h, names[i])
        if f[i] == NULL:
            return False
    cipher = (<_fetch_t>f[0])(NULL, b"AES-256-GCM", NULL)
    if cipher == NULL:
        return False
    prov = (<_get0_provider_t>f[1])(cipher)
    algs = (<_query_t>f[3])(prov, _OP_CIPHER, &no_cache) if prov != NULL else NULL
    if algs == NULL:
        (<_cipher_free_t>f[5])(cipher)
        return False
    memset(fn, 0, sizeof(fn))
    a = algs
    while a.names != NULL and not found:
        if a.implementation != NULL and b"AES-256-GCM" in (<bytes>a.names).upper().split(b":"):
            found = True
            d = a.implementation
            while d.function_id != 0:
                if 0 < d.function_id < 12:
                    fn[d.function_id] = d.function
                d += 1
        a += 1
    (<_unquery_t>f[4])(prov, _OP_CIPHER, algs)
    if not found or any(fn[i] == NULL for i in (
            _F_NEWCTX, _F_ENCRYPT_INIT, _F_DECRYPT_INIT, _F_UPDATE, _F_FINAL, _F_FREECTX,
            _F_GET_CTX_PARAMS, _F_SET_CTX_PARAMS)):
        (<_cipher_free_t>f[5])(cipher)
        return False
    _provctx = (<_provider_ctx_t>f[2])(prov)
    _p_newctx = <_p_newctx_t>fn[_F_NEWCTX]
    _p_einit = <_p_init_t>fn[_F_ENCRYPT_INIT]
    _p_dinit = <_p_init_t>fn[_F_DECRYPT_INIT]
    _p_update = <_p_update_t>fn[_F_UPDATE]
    _p_final = <_p_final_t>fn[_F_FINAL]
    _p_freectx = <_p_freectx_t>fn[_F_FREECTX]
    _p_get_params = <_p_get_params_t>fn[_F_GET_CTX_PARAMS]
    _p_set_params = <_p_set_params_t>fn[_F_SET_CTX_PARAMS]
    return True


LIBCRYPTO = _load_libcrypto()     # the library's name, or None: use cryptography's AESGCM
cdef bint _use_provider = False   # new Aead objects take the provider path
cdef uint8_t _EMPTY[1]


cdef inline void _tag_param(_Param* p, void* tag) noexcept nogil:
    """``p[0]`` = the 16-byte tag as an octet-string parameter, ``p[1]`` = the end."""
    p[0].key = _PARAM_TAG
    p[0].data_type = _PARAM_OCTET_STRING
    p[0].data = tag
    p[0].data_size = _TAG
    p[0].return_size = _PARAM_UNMODIFIED
    memset(&p[1], 0, sizeof(_Param))


cdef inline bint _p_seal(void* ctx, const uint8_t* nonce, const uint8_t* aad, int aad_len,
                         const uint8_t* data, int n, uint8_t* o) noexcept nogil:
    """The provider path of Aead.seal: ciphertext at ``o``, the tag after it. False on
    any failure. The calls and arguments are EVP's for the same steps: ``out`` NULL
    feeds AAD; the tag is a context parameter, read after final."""
    cdef size_t outl = 0, finl = 0
    cdef _Param p[2]
    if (_p_einit(ctx, NULL, 0, nonce, 12, NULL) != 1
            or _p_update(ctx, NULL, &outl, <size_t>aad_len, aad, <size_t>aad_len) != 1
            or _p_update(ctx, o, &outl, <size_t>n, data, <size_t>n) != 1
            or outl != <size_t>n
            or _p_final(ctx, o + n, &finl, 0) != 1
            or finl != 0):
        return False
    _tag_param(p, o + n)
    return _p_get_params(ctx, p) == 1 and p[0].return_size == _TAG


cdef inline int _p_open(void* ctx, const uint8_t* nonce, const uint8_t* aad, int aad_len,
                        const uint8_t* data, int m, uint8_t* o) noexcept nogil:
    """The provider path of Aead.open (``m`` bytes of ciphertext, then the tag): 1 with
    the plaintext at ``o``, 0 when the tag does not verify, -1 on any other failure.
    The tag is set as a context parameter before final, which checks it."""
    cdef size_t outl = 0, finl = 0
    cdef _Param p[2]
    if (_p_dinit(ctx, NULL, 0, nonce, 12, NULL) != 1
            or _p_update(ctx, NULL, &outl, <size_t>aad_len, aad, <size_t>aad_len) != 1
            or _p_update(ctx, o, &outl, <size_t>m, data, <size_t>m) != 1
            or outl != <size_t>m):
        return -1
    _tag_param(p, <void*>(data + m))
    if _p_set_params(ctx, p) != 1:
        return -1
    if _p_final(ctx, o + m, &finl, 0) != 1 or finl != 0:
        return 0
    return 1


cdef class Aead:
    """AES-256-GCM for one key and one direction (``encrypt``: seal, else open), with the
    ``encrypt``/``decrypt`` calls of cryptography's AESGCM (same results, InvalidTag).
    ``evp``: use the EVP calls even where the provider's functions are there."""

    cdef void* ctx
    cdef bint prov                   # ctx is the provider's context, not an EVP one
    cdef readonly bint sealing

    def __cinit__(self, bytes key, bint encrypt, bint evp=False):
        if LIBCRYPTO is None:
            raise RuntimeError("no libcrypto")
        if len(key) != 32:
            raise ValueError("AES-256-GCM takes a 32-byte key")
        self.prov = _use_provider and not evp
        if self.prov:
            self.ctx = _p_newctx(_provctx)
            if self.ctx == NULL:
                raise MemoryError()
            if (_p_einit if encrypt else _p_dinit)(
                    self.ctx, <const uint8_t*>PyBytes_AS_STRING(key), 32, NULL, 0, NULL) != 1:
                raise RuntimeError("AES-GCM key setup failed")
        else:
            self.ctx = _ctx_new()
            if self.ctx == NULL:
                raise MemoryError()
            if _cipher_init(self.ctx, _aes_256_gcm(), NULL,
                            <const uint8_t*>PyBytes_AS_STRING(key), NULL,
                            1 if encrypt else 0) != 1:
                raise RuntimeError("EVP_CipherInit_ex failed")
        self.sealing = encrypt

    def __dealloc__(self):
        if self.ctx != NULL:
            if self.prov:
                _p_freectx(self.ctx)
            else:
                _ctx_free(self.ctx)
            self.ctx = NULL

    @property
    def path(self):
        """"provider" or "evp": which calls this object makes."""
        return "provider" if self.prov else "evp"

    cdef bytes seal(self, const uint8_t* nonce, const uint8_t* aad, int aad_len,
                    const uint8_t* data, int n):
        """ciphertext + tag, or an exception (never a silent failure)."""
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n + _TAG)
        self.seal_to(nonce, aad, aad_len, data, n, <uint8_t*>PyBytes_AS_STRING(out))
        return out

    cdef int seal_to(self, const uint8_t* nonce, const uint8_t* aad, int aad_len,
                     const uint8_t* data, int n, uint8_t* o) except -1:
        """Write ciphertext + tag (``n`` + 16 bytes) at ``o``."""
        cdef int outl = 0, finl = 0
        if not self.sealing:
            raise ValueError("this key opens")
        if self.prov:
            if not _p_seal(self.ctx, nonce, aad, aad_len, data, n, o):
                raise RuntimeError("AES-GCM seal failed")
        elif (_cipher_init(self.ctx, NULL, NULL, NULL, nonce, 1) != 1
                or _cipher_update(self.ctx, NULL, &outl, aad, aad_len) != 1
                or _cipher_update(self.ctx, o, &outl, data if n else _EMPTY, n) != 1
                or _cipher_final(self.ctx, o + outl, &finl) != 1
                or outl + finl != n
                or _ctrl(self.ctx, _GCM_GET_TAG, _TAG, o + n) != 1):
            raise RuntimeError("AES-GCM seal failed")
        return 0

    cdef bytes open(self, const uint8_t* nonce, const uint8_t* aad, int aad_len,
                    const uint8_t* data, int n):
        """The plaintext, or None when the tag does not verify (or ``n`` < 16)."""
        if self.sealing:
            raise ValueError("this key seals")
        if n < _TAG:
            return None
        cdef int m = n - _TAG, r
        cdef bytes out = PyBytes_FromStringAndSize(NULL, m)
        cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
        cdef int outl = 0, finl = 0
        if self.prov:
            r = _p_open(self.ctx, nonce, aad, aad_len, data, m, o)
            if r < 0:
                raise RuntimeError("AES-GCM open failed")
            return out if r else None
        if (_cipher_init(self.ctx, NULL, NULL, NULL, nonce, 0) != 1
                or _cipher_update(self.ctx, NULL, &outl, aad, aad_len) != 1
                or _cipher_update(self.ctx, o, &outl, data if m else _EMPTY, m) != 1
                or _ctrl(self.ctx, _GCM_SET_TAG, _TAG, <void*>(data + m)) != 1):
            raise RuntimeError("AES-GCM open failed")
        if _cipher_final(self.ctx, o + outl, &finl) != 1 or outl + finl != m:
            return None
        return out

    def encrypt(self, nonce, data, associated_data):
        if type(nonce) is bytes and type(data) is bytes and type(associated_data) is bytes:
            if len(<bytes>nonce) != 12:
                raise ValueError("nonce must be 12 bytes")
            return self.seal(<const uint8_t*>PyBytes_AS_STRING(nonce),
                             <const uint8_t*>PyBytes_AS_STRING(associated_data),
                             <int>len(<bytes>associated_data),
                             <const uint8_t*>PyBytes_AS_STRING(data), <int>len(<bytes>data))
        return self.encrypt(_as_bytes(nonce), _as_bytes(data), _as_bytes(associated_data))

    def decrypt(self, nonce, data, associated_data):
        if not (type(nonce) is bytes and type(data) is bytes
                and type(associated_data) is bytes):
            return self.decrypt(_as_bytes(nonce), _as_bytes(data), _as_bytes(associated_data))
        if len(<bytes>nonce) != 12:
            raise ValueError("nonce must be 12 bytes")
        pt = self.open(<const uint8_t*>PyBytes_AS_STRING(nonce),
                       <const uint8_t*>PyBytes_AS_STRING(associated_data),
                       <int>len(<bytes>associated_data),
                       <const uint8_t*>PyBytes_AS_STRING(data), <int>len(<bytes>data))
        if pt is None:
            raise InvalidTag()
        return pt


cdef inline bytes _as_bytes(object b):
    return b"" if b is None else bytes(b)


cdef object _choose_path():
    """The path new Aead objects take: "provider" (the provider's functions, when they
    are there and give the EVP calls' bytes), "evp", or None (no libcrypto).
    ``UPMT_AEAD=evp`` in the environment keeps the EVP calls."""
    global _use_provider
    if LIBCRYPTO is None:
        return None
    if os.environ.get("UPMT_AEAD") == "evp" or not _load_provider(LIBCRYPTO.encode()):
        return "evp"
    _use_provider = True
    key, nonce, ad, msg = bytes(range(32)), bytes(range(12)), b"upmt", bytes(range(100))
    try:
        ct = Aead(key, True, evp=True).encrypt(nonce, msg, ad)
        ok = Aead(key, True, evp=False).encrypt(nonce, msg, ad) == ct
        opener = Aead(key, False, evp=False)
        ok = ok and opener.decrypt(nonce, ct, ad) == msg
        bad = bytearray(ct)
        bad[len(bad) - 1] ^= 1                       # (no negative indices in this file)
        try:
            opener.decrypt(nonce, bytes(bad), ad)
            ok = False
        except InvalidTag:
            pass
    except Exception:   # whatever it is, the EVP calls it is
        ok = False
    _use_provider = ok
    return "provider" if ok else "evp"


AEAD_PATH = _choose_path()   # "provider", "evp" or None: what Aead(key, e) does


# -- sealing and opening runs of tunnel packets (crypto.py has the reference) -------------

cdef uint64_t _REJECT = 0xFFFFFFFFFFFFFFFF - 0x2000   # crypto.REJECT_AFTER_MESSAGES
cdef enum:
    _BLOCKS = 32


cdef inline void _put32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline void _put64(uint8_t* p, uint64_t v) noexcept nogil:
    _put32(p, <uint32_t>(v >> 32))
    _put32(p + 4, <uint32_t>v)


cdef inline uint64_t _rd64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>_rd32(p) << 32) | _rd32(p + 4)


cdef class ReplayWindow:
    """See crypto.PyReplayWindow (RFC 6479 ring of 64-bit blocks): same answers."""

    cdef uint64_t blocks[_BLOCKS]
    cdef readonly uint64_t highest
    cdef readonly bint seen_any
    WINDOW = (_BLOCKS - 1) * 64

    def __cinit__(self):
        memset(self.blocks, 0, sizeof(self.blocks))
        self.highest = 0
        self.seen_any = False

    cpdef bint check(self, uint64_t counter):
        if counter >= _REJECT:
            return False
        if counter > self.highest or not self.seen_any:
            return True
        if self.highest - counter >= (_BLOCKS - 1) * 64:
            return False
        return not ((self.blocks[(counter >> 6) % _BLOCKS] >> (counter & 63)) & 1)

    cpdef void update(self, uint64_t counter):
        cdef int64_t cur, diff, i
        if counter > self.highest or not self.seen_any:
            cur = <int64_t>(self.highest >> 6) if self.seen_any else -1
            diff = <int64_t>(counter >> 6) - cur
            if diff > _BLOCKS:
                diff = _BLOCKS
            for i in range(1, diff + 1):
                self.blocks[(cur + i) % _BLOCKS] = 0
            self.highest = counter
            self.seen_any = True
        self.blocks[(counter >> 6) % _BLOCKS] |= (<uint64_t>1) << (counter & 63)


def seal_run(object aead, uint32_t word0, uint32_t receiver, uint64_t counter,
             list payloads, bint plain):
    """See crypto.py_seal_run (``aead``: an :class:`Aead` or cryptography's AESGCM)."""
    return _seal_list(aead, word0, receiver, counter, payloads, plain)


cdef bytes _seal_list(object aead, uint32_t word0, uint32_t receiver, uint64_t counter,
                      list payloads, bint plain):
    cdef Py_ssize_t k = len(payloads), first, ln, total = 0, i
    cdef Py_ssize_t extra = 16 if plain else 32
    cdef bytes out, b
    cdef uint8_t* o
    cdef uint8_t n12[12]
    cdef Aead fast = aead if isinstance(aead, Aead) else None
    if k == 0:
        return b""
    first = len(payloads[0])
    for i in range(k):
        ln = len(payloads[i])
        if ln > first or (ln < first and i < k - 1):
            raise ValueError("payloads of one run: all of one size but a shorter last")
        total += ln + extra
    out = PyBytes_FromStringAndSize(NULL, total)
    o = <uint8_t*>PyBytes_AS_STRING(out)
    memset(n12, 0, 4)
    for p in payloads:
        if type(p) is not bytes:
            p = bytes(p)
        b = <bytes>p
        ln = len(b)
        _put32(o, word0)
        _put32(o + 4, receiver)
        _put64(o + 8, counter)
        _put64(n12 + 4, counter)
        if plain:
            memcpy(o + 16, PyBytes_AS_STRING(b), ln)
        elif fast is not None:
            fast.seal_to(n12, o, 16, <const uint8_t*>PyBytes_AS_STRING(b), <int>ln, o + 16)
        else:
            ct = aead.encrypt(PyBytes_FromStringAndSize(<const char*>n12, 12), b,
                              PyBytes_FromStringAndSize(<const char*>o, 16))
            if len(ct) != ln + 16:
                raise RuntimeError("AES-GCM seal gave a wrong length")
            memcpy(o + 16, PyBytes_AS_STRING(ct), ln + 16)
        o += ln + extra
        counter += 1
    return out


def open_many(object aead, ReplayWindow window, uint32_t me, bint plain, bytes data,
              Py_ssize_t size):
    """See crypto.py_open_many (``aead``: an :class:`Aead` or cryptography's AESGCM)."""
    cdef list counters = [], pts = [], others = []
    cdef Py_ssize_t n = len(data), at = 0, end, ln
    cdef Py_ssize_t minimum = 16 if plain else 32
    cdef long bad = 0
    cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef const uint8_t* p
    cdef uint64_t counter
    cdef object pt
    cdef uint8_t n12[12]
    cdef Aead fast = aead if isinstance(aead, Aead) else None
    decrypt = None if fast is not None else aead.decrypt
    if size <= 0:
        raise ValueError("size must be positive")
    memset(n12, 0, 4)
    while at < n:
        end = at + size if at + size < n else n
        ln = end - at
        p = base + at
        at = end
        if ln < minimum or p[0] != 0x80 or _rd32(p + 4) != me:
            others.append(PyBytes_FromStringAndSize(<const char*>p, ln))
            continue
        counter = _rd64(p + 8)
        if not window.check(counter):
            bad += 1
            continue
        memcpy(n12 + 4, p + 8, 8)
        if plain:
            pt = PyBytes_FromStringAndSize(<const char*>p + 16, ln - 16)
        elif fast is not None:
            pt = fast.open(n12, p, 16, p + 16, <int>(ln - 16))
            if pt is None:
                bad += 1
                continue
        else:
            try:
                pt = decrypt(PyBytes_FromStringAndSize(<const char*>n12, 12),
                             PyBytes_FromStringAndSize(<const char*>p + 16, ln - 16),
                             PyBytes_FromStringAndSize(<const char*>p, 16))
            except InvalidTag:
                bad += 1
                continue
        window.update(counter)
        counters.append(counter)
        pts.append(pt)
    return counters, pts, others, bad


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
    -1 ICMP or other protocol with an L4 header to fix (the caller runs nat.py's code).
    A 16-byte ``new``: the same for an IPv6 TCP/UDP packet without extension headers
    (-1 for any other IPv6 packet: nat.py walks extension headers and ICMPv6)."""
    if new.shape[0] == 16:
        return _rewrite6(<uint8_t*><char*>pkt, len(pkt), &new[0], is_src)
    if new.shape[0] != 4:
        raise ValueError(f"an address is 4 or 16 bytes, got {new.shape[0]}")
    return _rewrite(<uint8_t*><char*>pkt, len(pkt), &new[0], is_src)


cdef int _rewrite6(uint8_t* p, Py_ssize_t size, const uint8_t* new, bint is_src) noexcept:
    """nat.py_rewrite6 for the common case (see rewrite_addr)."""
    if size < 40 or p[0] >> 4 != 6:
        return 0
    cdef Py_ssize_t end = 40 + _rd16(p + 4)
    if end > size:
        return 0
    cdef uint8_t proto = p[6]
    cdef Py_ssize_t at
    if proto == 6:
        at = 56
    elif proto == 17:
        at = 46
        if at + 2 <= end and p[at] == 0 and p[at + 1] == 0:
            return 0                     # UDP checksum 0: illegal in IPv6, refused
    else:
        return -1
    cdef uint8_t* a = p + (8 if is_src else 24)
    if memcmp(a, new, 16) == 0:
        return 1
    cdef uint64_t so = 0, sn = 0
    cdef int i
    for i in range(0, 16, 2):
        so += _rd16(a + i)
        sn += _rd16(new + i)
    cdef uint32_t d = <uint32_t>((sn + 8 * 0xFFFF - so) % 0xFFFF)
    memcpy(a, new, 16)
    cdef uint32_t c
    if at + 2 <= end:
        c = _adj(_rd16(p + at), d)
        _put16(p + at, c if (c or proto != 17) else 0xFFFF)
    return 1


cdef inline bint _put_addr4(uint8_t* p, uint8_t* a, const uint8_t* new, uint32_t* d
                            ) noexcept:
    """Put the IPv4 address ``new`` at ``a`` (the source or destination of the header at
    ``p``) and adjust the header checksum; ``d``: the checksum delta, for the L4 header.
    False (nothing done) when ``a`` holds ``new`` already."""
    cdef uint32_t old = (<uint32_t>a[0] << 24) | (<uint32_t>a[1] << 16) | (<uint32_t>a[2] << 8) | a[3]
    cdef uint32_t addr = (<uint32_t>new[0] << 24) | (<uint32_t>new[1] << 16) | (<uint32_t>new[2] << 8) | new[3]
    if old == addr:
        return False
    d[0] = <uint32_t>((<uint64_t>(old ^ 0xFFFFFFFF) + addr) % 0xFFFF)
    _put16(p + 10, _adj(_rd16(p + 10), d[0]))
    memcpy(a, new, 4)
    return True


cdef int _rewrite(uint8_t* p, Py_ssize_t size, const uint8_t* new, bint is_src) noexcept:
    if size < 20:
        return 0
    cdef Py_ssize_t hlen = (p[0] & 0x0F) << 2
    cdef Py_ssize_t total = _rd16(p + 2)
    if p[0] >> 4 != 4 or hlen < 20 or hlen > size or total > size or total < hlen:
        return 0
    cdef uint8_t proto = p[9]
    cdef bint first = (_rd16(p + 6) & 0x1FFF) == 0
    if first and proto == 1:
        return -1
    cdef uint32_t d
    if not _put_addr4(p, p + (12 if is_src else 16), new, &d):
        return 1
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


cdef inline int _runnable(bytes pb) noexcept:
    """4: an IPv4 TCP/UDP packet, no IP options, not a fragment: its 5-tuple is bytes 9
    and 12-23; 6: an IPv6 TCP/UDP packet without extension headers: bytes 6 and 8-43
    (see offload.py_flow_runs); 0: neither."""
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(pb)
    cdef Py_ssize_t n = len(pb)
    if (n >= 24 and p[0] == 0x45 and (p[9] == 6 or p[9] == 17)
            and not (p[6] & 0x3F) and not p[7]):
        return 4
    if n >= 44 and p[0] >> 4 == 6 and (p[6] == 6 or p[6] == 17):
        return 6
    return 0


def flow_runs(list pkts):
    """See offload.py_flow_runs."""
    cdef list runs = []
    cdef Py_ssize_t i, n = len(pkts), run = 0
    cdef bytes p, prev = None
    cdef int ok, prev_ok = 0
    cdef const char* a
    cdef const char* b
    for i in range(n):
        p = pkts[i]
        ok = _runnable(p)
        a = PyBytes_AS_STRING(p)
        b = PyBytes_AS_STRING(prev) if prev is not None else NULL
        if ok and ok == prev_ok and (
                (ok == 4 and a[9] == b[9] and memcmp(a + 12, b + 12, 12) == 0)
                or (ok == 6 and a[6] == b[6] and memcmp(a + 8, b + 8, 36) == 0)):
            run += 1
        else:
            if run:
                runs.append(run)
            run = 1
        prev, prev_ok = p, ok
    if run:
        runs.append(run)
    return runs


def rewrite_run(list pkts, Py_ssize_t start, Py_ssize_t end, bytes new, bint is_src):
    """See offload.py_rewrite_run."""
    if len(new) != 4 and len(new) != 16:
        raise ValueError(f"an address is 4 or 16 bytes, got {len(new)}")
    cdef list out = []
    cdef bytes p, q
    cdef Py_ssize_t i
    cdef bytearray b
    for i in range(start, end):
        p = pkts[i]
        q = PyBytes_FromStringAndSize(PyBytes_AS_STRING(p), len(p))
        if len(new) == 4:
            _rewrite(<uint8_t*>PyBytes_AS_STRING(q), len(q),
                     <const uint8_t*>PyBytes_AS_STRING(new), is_src)
        elif _rewrite6(<uint8_t*>PyBytes_AS_STRING(q), len(q),
                       <const uint8_t*>PyBytes_AS_STRING(new), is_src) < 0:
            b = bytearray(p)          # extension headers, ICMPv6: nat.py's code
            from upmt_tun.nat import py_rewrite6
            py_rewrite6(b, new, is_src)
            q = bytes(b)
        out.append(q)
    return out


cdef inline bint _tcpudp6(const uint8_t* p, Py_ssize_t size) noexcept:
    """A well-formed IPv6 TCP/UDP packet without extension headers, its ports inside, and
    for UDP a checksum that is not 0 (or not inside): what nat.py_five_tuple6 gives ports
    for without walking anything (size >= 44)."""
    cdef Py_ssize_t end = 40 + _rd16(p + 4)
    return (p[0] >> 4 == 6 and end <= size and end >= 44 and (p[6] == 6 or p[6] == 17)
            and not (p[6] == 17 and end >= 48 and p[46] == 0 and p[47] == 0))


def five_tuple_tcpudp(const uint8_t[:] pkt):
    """(proto, src, dst, sport, dport) of a well-formed unfragmented IPv4 TCP/UDP packet
    with its ports inside, or of an IPv6 one (``_tcpudp6``); None for anything else (the
    caller runs nat.py's code)."""
    cdef Py_ssize_t size = pkt.shape[0]
    if size < 24:
        return None
    cdef const uint8_t* p = &pkt[0]
    if p[0] >> 4 == 6:
        if size < 44 or not _tcpudp6(p, size):
            return None
        return (p[6], PyBytes_FromStringAndSize(<const char*>p + 8, 16),
                PyBytes_FromStringAndSize(<const char*>p + 24, 16), _rd16(p + 40), _rd16(p + 42))
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


cdef inline Py_ssize_t _mergeable6(bytes pb) noexcept:
    """See offload._mergeable6."""
    cdef Py_ssize_t n = len(pb)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(pb)
    if n < 61 or p[0] >> 4 != 6 or p[6] != 6 or 40 + _rd16(p + 4) != n:
        return 0
    cdef Py_ssize_t hl = 40 + (p[52] >> 4) * 4
    cdef uint8_t flags = p[53]
    if hl < 60 or hl >= n or not (flags & 0x10) or (flags & 0xE7):
        return 0
    return hl


cdef bytes _plain(bytes p):
    """A packet written as it is: behind an empty virtio-net header."""
    cdef bytes res = PyBytes_FromStringAndSize(NULL, 10 + len(p))
    cdef uint8_t* d = <uint8_t*>PyBytes_AS_STRING(res)
    memset(d, 0, 10)
    memcpy(d + 10, PyBytes_AS_STRING(p), len(p))
    return res


cdef bytes _super(list pkts, Py_ssize_t i, Py_ssize_t j, Py_ssize_t hl, Py_ssize_t total,
                  uint8_t gso_type, Py_ssize_t size, Py_ssize_t csum_start,
                  Py_ssize_t csum_offset):
    """``pkts[i:j]`` as one super-packet of ``total`` bytes: the virtio-net header
    (checksum partial; native byte order, x86: little-endian, as struct "="), the first
    packet's ``hl`` header bytes, then every packet's payload. The caller fixes the
    lengths and checksums of the header (at 10 + its offset)."""
    cdef bytes res = PyBytes_FromStringAndSize(NULL, 10 + total)
    cdef uint8_t* d = <uint8_t*>PyBytes_AS_STRING(res)
    cdef Py_ssize_t k, off = 10 + hl
    cdef bytes q
    d[0] = 1
    d[1] = gso_type
    (<unsigned short*>(d + 2))[0] = <unsigned short>hl
    (<unsigned short*>(d + 4))[0] = <unsigned short>size
    (<unsigned short*>(d + 6))[0] = <unsigned short>csum_start
    (<unsigned short*>(d + 8))[0] = <unsigned short>csum_offset
    memcpy(d + 10, PyBytes_AS_STRING(pkts[i]), hl)
    for k in range(i, j):
        q = pkts[k]
        memcpy(d + off, PyBytes_AS_STRING(q) + hl, len(q) - hl)
        off += len(q) - hl
    return res


cdef Py_ssize_t _coalesce6(list pkts, Py_ssize_t i, Py_ssize_t hl, list out):
    """See offload._coalesce6 (same bytes out)."""
    cdef Py_ssize_t n = len(pkts), j = i + 1, qs
    cdef bytes p = pkts[i], q, res
    cdef const uint8_t* pp = <const uint8_t*>PyBytes_AS_STRING(p)
    cdef const uint8_t* qp
    cdef uint8_t* d
    cdef Py_ssize_t size = len(p) - hl, total = len(p)
    cdef uint32_t nxt = _rd32(pp + 44) + <uint32_t>size
    cdef uint8_t lastflags = pp[53]
    while j < n and not (lastflags & 0x08):
        q = pkts[j]
        qs = len(q) - hl
        if _mergeable6(q) != hl or qs > size or total + qs > 65535:
            break
        qp = <const uint8_t*>PyBytes_AS_STRING(q)
        if (memcmp(qp, pp, 4) != 0 or qp[7] != pp[7] or memcmp(qp + 8, pp + 8, 36) != 0
                or memcmp(qp + 48, pp + 48, 4) != 0 or memcmp(qp + 54, pp + 54, 2) != 0
                or memcmp(qp + 60, pp + 60, hl - 60) != 0 or _rd32(qp + 44) != nxt):
            break
        total += qs
        nxt += <uint32_t>qs
        lastflags = qp[53]
        j += 1
        if qs < size:
            break
    if j - i == 1:
        out.append(_plain(p))
        return j
    res = _super(pkts, i, j, hl, total, 4, size, 40, 16)     # VIRTIO_NET_HDR_GSO_TCPV6
    d = <uint8_t*>PyBytes_AS_STRING(res)
    _put16(d + 14, <uint32_t>(total - 40))
    d[63] |= lastflags & 0x08
    _put16(d + 66, _fold(_sum(d + 18, 32) + 6 + <uint64_t>(total - 40)))
    out.append(res)
    return j


cdef inline bint _mergeable_udp(bytes pb) noexcept:
    """See offload._mergeable_udp."""
    cdef Py_ssize_t n = len(pb)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(pb)
    return (n > 28 and p[0] == 0x45 and p[9] == 17 and not (p[6] & 0x3F) and not p[7]
            and _rd16(p + 2) == n and _rd16(p + 24) == n - 20)


cdef Py_ssize_t _coalesce_udp(list pkts, Py_ssize_t i, list out):
    """See offload._coalesce_udp (same bytes out)."""
    cdef Py_ssize_t n = len(pkts), j = i + 1, qs
    cdef bytes p = pkts[i], q, res
    cdef const uint8_t* pp = <const uint8_t*>PyBytes_AS_STRING(p)
    cdef const uint8_t* qp
    cdef uint8_t* d
    cdef Py_ssize_t size = len(p) - 28, total = len(p)
    while j < n and j - i < 64:
        q = pkts[j]
        qs = len(q) - 28
        if not _mergeable_udp(q) or qs > size or total + qs > 65535:
            break
        qp = <const uint8_t*>PyBytes_AS_STRING(q)
        if (memcmp(qp + 12, pp + 12, 12) != 0 or qp[1] != pp[1] or qp[8] != pp[8]
                or qp[6] != pp[6]):
            break
        total += qs
        j += 1
        if qs < size:
            break
    if j - i == 1:
        out.append(_plain(p))
        return j
    res = _super(pkts, i, j, 28, total, 5, size, 20, 6)      # VIRTIO_NET_HDR_GSO_UDP_L4
    d = <uint8_t*>PyBytes_AS_STRING(res)
    _put16(d + 12, <uint32_t>total)
    d[20] = 0
    d[21] = 0
    _put16(d + 20, _fold(_sum(d + 10, 20)) ^ 0xFFFF)
    _put16(d + 34, <uint32_t>(total - 20))
    _put16(d + 36, _fold(_sum(d + 22, 8) + 17 + <uint64_t>(total - 20)))
    out.append(res)
    return j


def coalesce(list pkts, bint uso=False):
    """See offload.py_coalesce (same bytes out)."""
    cdef list out = []
    cdef Py_ssize_t i = 0, j, n = len(pkts), hl, size, qs, total
    cdef uint32_t nxt
    cdef bytes p, q, res
    cdef const uint8_t* pp
    cdef const uint8_t* qp
    cdef uint8_t* d
    cdef uint8_t lastflags
    while i < n:
        p = pkts[i]
        hl = _mergeable(p)
        if not hl:
            hl = _mergeable6(p)
            if hl:
                i = _coalesce6(pkts, i, hl, out)
                continue
            if uso and _mergeable_udp(p):
                i = _coalesce_udp(pkts, i, out)
                continue
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
            out.append(_plain(p))
            i = j
            continue
        res = _super(pkts, i, j, hl, total, 1, size, 20, 16)  # VIRTIO_NET_HDR_GSO_TCPV4
        d = <uint8_t*>PyBytes_AS_STRING(res)
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


cdef inline object _packed_key6(const uint8_t* p, bint reverse):
    """flowtable.pack_key of the IPv6 TCP/UDP packet at ``p`` (``_tcpudp6``): the family
    byte 1, then src|proto|dst|sport|dport."""
    cdef uint8_t k[38]
    k[0] = 1
    if reverse:
        memcpy(k + 1, p + 24, 16)
        memcpy(k + 18, p + 8, 16)
        memcpy(k + 34, p + 42, 2)
        memcpy(k + 36, p + 40, 2)
    else:
        memcpy(k + 1, p + 8, 16)
        memcpy(k + 18, p + 24, 16)
        memcpy(k + 34, p + 40, 4)
    k[17] = p[6]
    return upmt_key_from_be(k, 38)


def flow_key_tcpudp(const uint8_t[:] pkt, bint reverse):
    """flowtable.pack_key of the 5-tuple of a well-formed unfragmented IPv4 TCP/UDP packet
    with its ports inside, or of an IPv6 one (``_tcpudp6``) (``reverse``: of the reversed
    5-tuple, a downlink packet's uplink key); None for anything else (the caller runs
    flowtable.py's code)."""
    cdef Py_ssize_t size = pkt.shape[0]
    if size >= 44 and pkt[0] >> 4 == 6:
        return _packed_key6(&pkt[0], reverse) if _tcpudp6(&pkt[0], size) else None
    if size < 24 or not _tcpudp(&pkt[0], size):
        return None
    return _packed_key(&pkt[0], (pkt[0] & 0x0F) << 2, reverse)


def uplink_key_tcpudp(const uint8_t[:] pkt, bytes src):
    """flowtable.py_uplink_key for a well-formed unfragmented IPv4 TCP/UDP packet with its
    ports inside (``src`` 4 bytes), or an IPv6 one (``_tcpudp6``, ``src`` 16 bytes): its
    packed key if it comes from ``src``, 0 if it does not; None for anything else (the
    caller runs flowtable.py's code)."""
    cdef Py_ssize_t size = pkt.shape[0]
    if len(src) == 16:
        if size < 44 or pkt[0] >> 4 != 6 or not _tcpudp6(&pkt[0], size):
            return None
        if memcmp(&pkt[8], PyBytes_AS_STRING(src), 16) != 0:
            return 0
        return _packed_key6(&pkt[0], False)
    if len(src) != 4:
        raise ValueError(f"an address is 4 or 16 bytes, got {len(src)}")
    if size < 24 or not _tcpudp(&pkt[0], size):
        return None
    if memcmp(&pkt[12], PyBytes_AS_STRING(src), 4) != 0:
        return 0
    return _packed_key(&pkt[0], (pkt[0] & 0x0F) << 2, False)


# -- burst I/O on the TUN: many reads or writes per C call ---------------------------------

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EAGAIN, EINTR, errno
from posix.unistd cimport read as c_read
from posix.unistd cimport write as c_write


cdef inline bint _finish(uint8_t* p, Py_ssize_t n, Py_ssize_t csum_start,
                         Py_ssize_t csum_offset) noexcept nogil:
    """finish_csum on a C buffer."""
    cdef Py_ssize_t at = csum_start + csum_offset
    if csum_start < 20 or at + 2 > n:
        return False
    cdef uint32_t c = _fold(_sum(p + csum_start, n - csum_start)) ^ 0xFFFF
    if c == 0 and (p[9] == 17 if p[0] >> 4 != 6 else csum_offset == 6):
        c = 0xFFFF
    _put16(p + at, c)
    return True


cdef inline uint16_t _native16(const uint8_t* p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef class BurstReader:
    """Reads up to ``max_n`` packets from non-blocking ``fd`` per :meth:`read` into one
    buffer allocated once (room for ``cap`` bytes, and one read of ``size`` more), with the
    GIL released around the system calls: the packets of a wake-up for the cost of one
    Python call, without ``os.read``'s allocation of ``size`` bytes per packet. With
    ``vnet`` (a TUN with IFF_VNET_HDR) a read that is one ordinary packet comes without its
    virtio-net header and with its partial checksum completed (offload.packets); any other
    read (a super-packet, or what packets() refuses) keeps its header, is counted as
    special and ends the call. See io.PyBurstReader, the reference."""

    cdef int fd
    cdef bint vnet
    cdef Py_ssize_t size, cap, max_n
    cdef char* buf
    cdef Py_ssize_t* starts
    cdef Py_ssize_t* ends

    def __cinit__(self, int fd, Py_ssize_t size, Py_ssize_t cap, Py_ssize_t max_n,
                  bint vnet=False):
        if size <= 0 or cap < 0 or max_n <= 0:
            raise ValueError("size and max_n must be > 0, cap >= 0")
        self.fd, self.size, self.cap, self.max_n, self.vnet = fd, size, cap, max_n, vnet
        self.buf = <char*>PyMem_Malloc(cap + size)
        self.starts = <Py_ssize_t*>PyMem_Malloc(max_n * sizeof(Py_ssize_t))
        self.ends = <Py_ssize_t*>PyMem_Malloc(max_n * sizeof(Py_ssize_t))
        if self.buf == NULL or self.starts == NULL or self.ends == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.buf)
        PyMem_Free(self.starts)
        PyMem_Free(self.ends)

    def read(self, Py_ssize_t limit=0):
        """Up to ``limit`` (0: ``max_n``) reads -> (the packets, 0 when the fd is drained
        (EAGAIN), -1 when the limit or the buffer was reached first, else the errno of a
        failed read, which ends the burst; 1 when the last read kept its virtio-net
        header, else 0)."""
        cdef Py_ssize_t n = 0, off = 0, r, special = 0, hl = 10
        cdef Py_ssize_t most = self.max_n if limit <= 0 or limit > self.max_n else limit
        cdef int err = -1
        cdef uint8_t* p
        with nogil:
            while n < most and off <= self.cap:
                r = c_read(self.fd, self.buf + off, self.size)
                if r < 0:
                    if errno == EINTR:
                        continue
                    err = 0 if errno == EAGAIN else errno      # EWOULDBLOCK is EAGAIN on Linux
                    break
                self.starts[n], self.ends[n] = off, off + r
                if self.vnet:
                    p = <uint8_t*>self.buf + off
                    if (r > hl and p[1] & 0x7F == 0 and (
                            not p[0] & 1 or _finish(p + hl, r - hl, _native16(p + 6),
                                                    _native16(p + 8)))):
                        self.starts[n] = off + hl        # one complete packet
                    else:
                        special = 1         # handed over now: a super-packet waits for
                        n += 1              # nothing (its datagrams leave at once)
                        break
                off += r
                n += 1
        cdef list out = []
        cdef Py_ssize_t i
        for i in range(n):
            out.append(PyBytes_FromStringAndSize(self.buf + self.starts[i],
                                                 self.ends[i] - self.starts[i]))
        return out, err, special


def write_all(int fd, list pkts):
    """Write each of ``pkts`` (bytes) to ``fd``, one write(2) each, the GIL released
    around the loop -> how many failed (EINVAL for a bad packet, EAGAIN when full: each a
    counted drop, as io.py_write_all)."""
    cdef Py_ssize_t n = len(pkts), i, failed = 0
    if n == 0:
        return 0
    cdef const char** ptrs = <const char**>PyMem_Malloc(n * sizeof(char*))
    cdef Py_ssize_t* lens = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t))
    cdef bytes p
    if ptrs == NULL or lens == NULL:
        PyMem_Free(ptrs)
        PyMem_Free(lens)
        raise MemoryError()
    try:
        for i in range(n):
            p = pkts[i]
            ptrs[i] = PyBytes_AS_STRING(p)
            lens[i] = len(p)
        with nogil:      # pkts holds every packet alive meanwhile
            for i in range(n):
                while c_write(fd, ptrs[i], lens[i]) < 0:
                    if errno != EINTR:
                        failed += 1
                        break
    finally:
        PyMem_Free(ptrs)
        PyMem_Free(lens)
    return failed


# -- the agent's compiled uplink for established IPv4 flows (forwarder.AgentForwarder.lane) --

from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject

cdef str _UP = "up"


cdef class _LaneEntry:
    """One learnt route: the objects AgentForwarder._route found for a flow."""
    cdef object flow, fid, tunnel, tid, link, session


cdef inline int _lane_key(const uint8_t* p, Py_ssize_t size, const uint8_t* src,
                          uint64_t* key) noexcept:
    """Which table (0 TCP, 1 UDP, 2 ICMP echo) and key (dst | sport | dport) an IPv4
    packet from ``src`` takes, as nat.five_tuple keys it; -1: not one for the lane."""
    if size < 24 or memcmp(p + 12, src, 4) != 0:
        return -1
    cdef Py_ssize_t hlen = (p[0] & 0x0F) << 2
    cdef uint64_t dst = _rd32(p + 16)
    cdef uint32_t ident
    if p[9] == 6 or p[9] == 17:
        if not _tcpudp(p, size):
            return -1
        key[0] = dst << 32 | _rd32(p + hlen)
        return 0 if p[9] == 6 else 1
    cdef Py_ssize_t total = _rd16(p + 2)
    if (p[9] != 1 or p[0] >> 4 != 4 or hlen < 20 or hlen + 8 > total or total > size
            or (_rd16(p + 6) & 0x1FFF) or (p[hlen] != 8 and p[hlen] != 0)):
        return -1
    ident = _rd16(p + hlen + 4)
    key[0] = dst << 32 | ident << 16 | ident
    return 2


cdef bint _rewrite_src4(uint8_t* p, Py_ssize_t size, const uint8_t* new) noexcept:
    """nat.rewrite_src of a packet _lane_key accepted: TCP/UDP by _rewrite, an ICMP echo
    in its IP header only (its checksum covers no address)."""
    if p[9] != 1:
        return _rewrite(p, size, new, True) == 1
    cdef uint32_t d
    _put_addr4(p, p + 12, new, &d)
    return True


cdef class UpLane:
    """The agent's uplink for flows it has routed before, compiled: a TUN burst's IPv4
    TCP, UDP and ICMP echo packets of a learnt flow are checked, NATed, sealed and queued
    here with the datagrams, counters and session counters of ``AgentForwarder.from_tun``
    (``tests/test_lane.py`` compares them); anything else, and a flow whose route changed
    since (moved, tunnel down or gone, new session, flow expired), is handed back, in
    order, to the Python path, which learns the route again (``learn``).

    Each hit reads the route's objects again (flow.tunnel, the tunnel's state, address,
    socket and remote, the link's session), so nothing needs telling when they change;
    only what identifies the route is cached. One thread, the event loop's, as the rest
    of the forwarder."""

    cdef dict tcp, udp, icmp
    cdef object fwd
    cdef bytes src
    cdef dict by_id, by_tid, links          # the forwarder's, read again at each run
    cdef list queues, queues_run
    cdef public long hits
    cdef public bint queued                 # something went to a queue: flush it

    def __init__(self, object fwd, list queues, list queues_run):
        """``fwd``: the AgentForwarder (its vipa_fix_b, paft.by_id, tunnels.by_tid and
        links are read at each run); ``queues``/``queues_run``: the agent's per-socket
        ``PathSocket.queue``/``queue_run``."""
        self.fwd = fwd
        self.queues, self.queues_run = queues, queues_run
        self.tcp, self.udp, self.icmp = {}, {}, {}
        self.hits = 0
        self.queued = False

    def __len__(self):
        return len(self.tcp) + len(self.udp) + len(self.icmp)

    cdef dict _table(self, int which):
        return self.tcp if which == 0 else (self.udp if which == 1 else self.icmp)

    def learn(self, tuple key, object flow, object tunnel, object link, object session):
        """``_route`` found (flow, tunnel, session) for the 5-tuple ``key``: remember it
        when the lane can carry that flow (IPv4 TCP/UDP/ICMP echo, not a relay path)."""
        cdef int proto = key[0]
        cdef int which = 0 if proto == 6 else (1 if proto == 17 else (2 if proto == 1 else -1))
        if which < 0 or len(key[1]) != 4 or key[1] != self.fwd.vipa_fix_b \
                or tunnel.remote[1] == 0 or not 0 <= tunnel.un_tid <= 0xFFFFFF:
            return
        if proto == 1 and key[3] != key[4]:
            return
        cdef uint64_t k = (<uint64_t>int.from_bytes(key[2], "big") << 32
                           | <uint64_t>key[3] << 16 | <uint64_t>key[4])
        cdef _LaneEntry e = _LaneEntry.__new__(_LaneEntry)
        e.flow, e.fid, e.tunnel, e.tid = flow, flow.fid, tunnel, flow.tunnel
        e.link, e.session = link, session
        self._table(which)[k] = e

    def prune(self):
        """Forget the routes of flows no longer in the PAFT (expired, removed): how many.
        (A hit finds them too, but a flow that never sends again is never hit.)"""
        cdef dict by_id = self.fwd.paft.by_id
        cdef dict table
        cdef _LaneEntry e
        cdef list dead
        cdef long n = 0
        for table in (self.tcp, self.udp, self.icmp):
            dead = []
            for k, v in table.items():
                e = <_LaneEntry>v
                if by_id.get(e.fid) is not e.flow:
                    dead.append(k)
            for k in dead:
                del table[k]
            n += len(dead)
        return n

    cdef _LaneEntry _valid(self, dict table, object k):
        """The entry at ``k`` if its route still holds (forgotten if not), else None."""
        cdef PyObject* hit = PyDict_GetItem(table, k)
        if hit == NULL:
            return None
        cdef _LaneEntry e = <_LaneEntry>hit
        cdef object t = e.tunnel
        cdef PyObject* cur
        cur = PyDict_GetItem(self.by_id, e.fid)
        if cur == NULL or <object>cur is not e.flow:
            del table[k]
            return None
        cur = PyDict_GetItem(self.by_tid, e.tid)
        if cur == NULL or <object>cur is not t or e.flow.tunnel != e.tid or t.state != _UP:
            del table[k]
            return None
        cur = PyDict_GetItem(self.links, t.peer)
        if cur == NULL or <object>cur is not e.link or e.link.session is not e.session:
            del table[k]
            return None
        return e

    def run(self, list pkts, double now):
        """Carry what it can of one TUN burst (``pkts``, each one packet); the rest, in
        order, for ``AgentForwarder.from_tun_many`` (an empty list: all carried)."""
        cdef list rest = []
        cdef Py_ssize_t n = len(pkts), i = 0, j
        cdef int which
        cdef uint64_t k
        cdef object ko, pkt
        cdef dict table
        cdef _LaneEntry e
        fwd = self.fwd
        self.src = fwd.vipa_fix_b
        if len(self.src) != 4:
            return list(pkts)
        self.by_id, self.by_tid, self.links = fwd.paft.by_id, fwd.tunnels.by_tid, fwd.links
        while i < n:
            pkt = pkts[i]
            which = -1
            if type(pkt) is bytes:
                which = _lane_key(<const uint8_t*>PyBytes_AS_STRING(pkt), len(pkt),
                                  <const uint8_t*>PyBytes_AS_STRING(self.src), &k)
            if which < 0:
                rest.append(pkt)
                i += 1
                continue
            table = self._table(which)
            ko = k
            e = self._valid(table, ko)
            j = i + 1
            while j < n and type(pkts[j]) is bytes and _lane_key(
                    <const uint8_t*>PyBytes_AS_STRING(pkts[j]), len(pkts[j]),
                    <const uint8_t*>PyBytes_AS_STRING(self.src), &k) == which and k == ko:
                j += 1
            if e is None or not self._carry(e, pkts, i, j, now):
                rest.extend(pkts[i:j])
            i = j
        return rest

    cdef bint _carry(self, _LaneEntry e, list pkts, Py_ssize_t i, Py_ssize_t j, double now):
        """pkts[i:j], one flow's, NATed, sealed and queued as from_tun does; False (with
        nothing done) when the session cannot take them here."""
        cdef object t = e.tunnel, s = e.session, flow = e.flow
        cdef object remote = t.remote
        cdef bytes vipa = t.vipa_b
        if remote[1] == 0 or len(vipa) != 4:
            return False
        cdef uint64_t counter = s.send_counter
        cdef Py_ssize_t count = j - i
        if counter + <uint64_t>count > _REJECT:
            return False
        cdef bint plain = s.plain_data
        cdef object aead = s._send
        cdef object un_tid = t.un_tid
        if not 0 <= un_tid <= 0xFFFFFF:
            return False
        cdef uint32_t word0 = 0x80 << 24 | <uint32_t>un_tid
        cdef uint32_t receiver = s.remote_index
        cdef list inner = []
        cdef bytes out, b
        cdef Py_ssize_t a, c, ln, total = 0
        for a in range(i, j):
            b = <bytes>pkts[a]
            ln = len(b)
            out = PyBytes_FromStringAndSize(PyBytes_AS_STRING(b), ln)
            if not _rewrite_src4(<uint8_t*>PyBytes_AS_STRING(out), ln,
                                 <const uint8_t*>PyBytes_AS_STRING(vipa)):
                return False
            inner.append(out)
            total += ln
        cdef object index = t.iface_index
        cdef object queue = self.queues[index], queue_run = self.queues_run[index]
        cdef Py_ssize_t extra = 16 if plain else 32
        a = 0
        while a < count:                      # even runs, as forwarder.even_runs cuts them
            ln = len(<bytes>inner[a])
            c = a + 1
            while c < count and len(<bytes>inner[c]) == ln:
                c += 1
            if c < count and len(<bytes>inner[c]) < ln:
                c += 1
            out = _seal_list(aead, word0, receiver, counter, inner[a:c], plain)
            counter += c - a
            if not _send_now(queue, out, 0 if c - a == 1 else ln + extra, remote):
                self.queued = True
                if c - a == 1:
                    queue(out, remote)
                else:
                    queue_run(out, ln + extra, remote)
            a = c
        s.send_counter = counter
        flow.tx_packets += count
        flow.last_seen = now
        t.tx_packets += count
        t.tx_bytes += total
        self.hits += count
        return True



# -- sends of the lane, and the agent's TUN reader, without the Python path ---------------

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        void* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    int AF_INET, AF_INET6

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char* src, void* dst)
    uint16_t htons(uint16_t)

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in6:
        unsigned short sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

cdef enum:
    _GSO_SEGS = 64          # io.GSO_MAX_SEGMENTS
    _GSO_BYTES = 65000      # io.GSO_MAX_BYTES


cdef bint _sockaddr(object remote, bint v6, sockaddr_in6* sa6, sockaddr_in* sa4,
                    socklen_t* ln):
    """The destination ``remote`` ((host, port), as PathSocket takes it) for an AF_INET
    (``v6`` False) or a dual-stack AF_INET6 socket (IPv4 as ::ffff:a.b.c.d)."""
    cdef object h = remote[0], p = remote[1]
    if type(h) is not str or type(p) is not int or not 0 <= p <= 0xFFFF:
        return False
    cdef bytes host = (<str>h).encode("ascii", "replace")
    cdef int port = p
    cdef uint8_t a4[4]
    memset(sa6, 0, sizeof(sockaddr_in6))
    memset(sa4, 0, sizeof(sockaddr_in))
    if inet_pton(AF_INET, host, a4) == 1:
        if v6:
            sa6.sin6_family = AF_INET6
            sa6.sin6_port = htons(port)
            sa6.sin6_addr.s6_addr[10] = 0xFF
            sa6.sin6_addr.s6_addr[11] = 0xFF
            memcpy(&sa6.sin6_addr.s6_addr[12], a4, 4)
            ln[0] = sizeof(sockaddr_in6)
        else:
            sa4.sin_family = AF_INET
            sa4.sin_port = htons(port)
            memcpy(&sa4.sin_addr, a4, 4)
            ln[0] = sizeof(sockaddr_in)
        return True
    if v6 and inet_pton(AF_INET6, host, &sa6.sin6_addr) == 1:
        sa6.sin6_family = AF_INET6
        sa6.sin6_port = htons(port)
        ln[0] = sizeof(sockaddr_in6)
        return True
    return False


cdef bint _send_now(object queue, bytes data, Py_ssize_t size, object remote):
    """Send ``data`` (one datagram, or datagrams of ``size`` bytes back to back) on the
    socket of the PathSocket whose ``queue`` this is, as its flush would: UDP GSO sends of
    at most 64 datagrams and 65000 bytes. False (nothing sent) when it cannot be done here:
    not a PathSocket, something already waits in its queue (order), GSO off, a closed
    socket, an address it does not take. A failed send goes to the PathSocket's own
    code, which counts it (and turns GSO off when the kernel refuses it)."""
    cdef object path = getattr(queue, "__self__", None)
    if path is None:
        return False
    cdef object runs = getattr(path, "_runs", None)
    if type(runs) is not list or len(<list>runs) or (size and not path.gso):
        return False
    cdef object fileno = getattr(getattr(path, "sock", None), "fileno", None)
    if fileno is None:
        return False
    cdef int fd = fileno()
    if fd < 0:
        return False
    cdef sockaddr_in6 sa6
    cdef sockaddr_in sa4
    cdef socklen_t salen = 0
    cdef bint v6 = path.v6
    if not _sockaddr(remote, v6, &sa6, &sa4, &salen):
        return False
    cdef msghdr msg
    cdef iovec iov
    cdef char cbuf[32]          # CMSG_SPACE(2)
    cdef cmsghdr* cm = <cmsghdr*>cbuf
    cdef Py_ssize_t n = len(data), at = 0, step, chunk
    cdef const char* base = PyBytes_AS_STRING(data)
    cdef ssize_t r
    memset(&msg, 0, sizeof(msghdr))
    msg.msg_name = <void*>&sa6 if v6 else <void*>&sa4
    msg.msg_namelen = salen
    msg.msg_iov = &iov
    msg.msg_iovlen = 1
    step = n if size == 0 else size * max(1, min(<Py_ssize_t>_GSO_SEGS, _GSO_BYTES // size))
    while at < n:
        chunk = min(step, n - at)
        iov.iov_base = <void*>(base + at)
        iov.iov_len = chunk
        if size and chunk > size:
            memset(cbuf, 0, sizeof(cbuf))
            cm.cmsg_len = sizeof(cmsghdr) + 2
            cm.cmsg_level = 17          # SOL_UDP
            cm.cmsg_type = 103          # UDP_SEGMENT
            (<uint16_t*>(cbuf + sizeof(cmsghdr)))[0] = <uint16_t>size
            msg.msg_control = cbuf
            msg.msg_controllen = sizeof(cbuf)
        else:
            msg.msg_control = NULL
            msg.msg_controllen = 0
        with nogil:
            r = sendmsg(fd, &msg, 0)
        if r < 0:                        # the rest as PathSocket does it: counted drops,
            rest = data[at:]             # or GSO turned off and sent one by one
            if size:
                path._send_run(rest, size, remote)
            else:
                path._send(rest, remote)
            return True
        at += chunk
    return True


cdef class TunPump:
    """The agent's TUN reader callback (``loop.add_reader(fd, pump)``), compiled: each
    wake-up's reads (``BurstReader``) go to the lane (``UpLane.run``), which sends a
    learnt flow's datagrams at once; only what it hands back (``hand``), a special read
    (``odd``: a super-packet) or a failed read (``failed``) call Python, and then, or
    when the owner's links sleep (``owner._quiet``) or a datagram went to a queue, its
    ``flush``. What io.TunDevice's Python reader does, minus the Python frames of a
    wake-up whose packets all hit the lane."""

    cdef BurstReader reader
    cdef UpLane lane
    cdef object clock, hand, odd, flush, failed, owner
    cdef Py_ssize_t max_burst
    cdef public long wakeups, python

    def __init__(self, BurstReader reader, UpLane lane, object clock, object hand,
                 object odd, object flush, object failed, object owner,
                 Py_ssize_t max_burst):
        self.reader, self.lane, self.clock = reader, lane, clock
        self.hand, self.odd, self.flush, self.failed = hand, odd, flush, failed
        self.owner, self.max_burst = owner, max_burst
        self.wakeups = self.python = 0

    def __call__(self):
        cdef Py_ssize_t left = self.max_burst, n
        cdef bint touched = False
        cdef list reads, lst, rest
        cdef long err
        self.wakeups += 1
        self.lane.queued = False
        try:
            while left > 0:
                reads, err, special = self.reader.read(left)
                n = len(reads)
                left -= n
                lst = reads[:n - 1] if special and n else reads   # (no wraparound here)
                if lst:
                    rest = self.lane.run(lst, self.clock())
                    if rest:
                        touched = True
                        self.hand(rest)
                if special and n:
                    touched = True
                    self.odd(reads[n - 1])
                if err >= 0:
                    if err:
                        touched = True
                        self.failed(err)
                    return
        finally:
            if touched or self.lane.queued or self.owner._quiet:
                self.python += 1
                self.flush()
