"""The age v1 file format (https://age-encryption.org/v1, C2SP) for X25519 recipients.

Muster encrypts tar+zstd backup volumes while it uploads them, and restores a single file by
fetching only the ciphertext chunks that hold it with a ranged GET. No Python age library can
both stream push-style and decrypt an arbitrary run of chunks, so the format is written out
here on top of `cryptography` alone:

* `Encryptor` is a writable file object that produces a standard age file as bytes arrive.
* `Decryptor` is a readable file object that checks every rule of the spec while it streams.
* `open_header` and `PayloadKey.decrypt_chunks` decrypt chunks N..M from a slice of the file,
  with `ciphertext_offset` and `is_final_chunk` saying which bytes to fetch.

Files interoperate both ways with the reference `age` CLI; identities are the strings and files
that `age-keygen` writes. Passphrase (scrypt), plugin, post-quantum recipients and ASCII
armour are out of scope: such files fail with a clear `AgeError`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import hmac
import io
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "CHUNK_OVERHEAD",
    "CHUNK_SIZE",
    "ENCRYPTED_CHUNK_SIZE",
    "NONCE_SIZE",
    "AgeError",
    "Decryptor",
    "Encryptor",
    "HeaderError",
    "HeaderMacError",
    "Identity",
    "IncompleteHeader",
    "KeyFormatError",
    "NoIdentityMatch",
    "PayloadError",
    "PayloadKey",
    "Recipient",
    "chunk_count",
    "ciphertext_offset",
    "ciphertext_size",
    "decrypt_bytes",
    "encrypt_bytes",
    "is_final_chunk",
    "load_identities",
    "open_header",
    "plaintext_size",
    "write_identity",
]

CHUNK_SIZE = 64 * 1024
"""Plaintext bytes per STREAM chunk; every chunk but the last holds exactly this many."""
CHUNK_OVERHEAD = 16
"""The Poly1305 tag that each chunk adds to its plaintext."""
ENCRYPTED_CHUNK_SIZE = CHUNK_SIZE + CHUNK_OVERHEAD
NONCE_SIZE = 16
"""The random payload nonce written right after the header."""
FILE_KEY_SIZE = 16
MAX_HEADER_SIZE = 1 << 20
"""A bound so that a non-age source cannot make the reader buffer without end."""

_VERSION_LINE = b"age-encryption.org/v1"
_X25519_LABEL = b"age-encryption.org/v1/X25519"
_SECRET_HRP = "AGE-SECRET-KEY-"
_PUBLIC_HRP = "age"
_ZERO_NONCE = bytes(12)
_LAST = b"\x01"
_NOT_LAST = b"\x00"
_READ_BLOCK = 4096


# --- errors ------------------------------------------------------------------------------


class AgeError(Exception):
    """Anything that stops an age operation; never carries key material."""


class KeyFormatError(AgeError, ValueError):
    """An identity or recipient string (or identity file) is malformed."""


class HeaderError(AgeError):
    """The file does not start with a well-formed age v1 header."""


class IncompleteHeader(HeaderError):
    """The bytes given end before the header (and payload nonce) does.

    `open_header` raises it so that a caller holding a prefix of the file knows to fetch a
    longer one; `available` is how many bytes it had.
    """

    def __init__(self, available: int) -> None:
        super().__init__(
            f"the first {available} bytes do not hold the whole age header and payload nonce: "
            "the file is truncated, or fetch a longer prefix and try again"
        )
        self.available = available


class HeaderMacError(HeaderError):
    """A file key was unwrapped but the header MAC does not match: the header was altered."""


class NoIdentityMatch(AgeError):
    """None of the recipient stanzas can be opened with the identities given."""


class PayloadError(AgeError):
    """The encrypted payload is truncated, altered, or has data after its final chunk."""


# --- bech32 (BIP 173), as age uses it for keys, with no length limit -----------------------

_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_INDEX = {c: i for i, c in enumerate(_BECH32)}


def _polymod(values: Iterable[int]) -> int:
    generators = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    chk = 1
    for value in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ value
        for i, gen in enumerate(generators):
            if top >> i & 1:
                chk ^= gen
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: Iterable[int], from_bits: int, to_bits: int, pad: bool) -> list[int]:
    acc = bits = 0
    out = []
    mask = (1 << to_bits) - 1
    for value in data:
        acc = acc << from_bits | value
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append(acc >> bits & mask)
    if pad and bits:
        out.append(acc << (to_bits - bits) & mask)
    elif not pad and (bits >= from_bits or acc << (to_bits - bits) & mask):
        raise ValueError("non-zero padding")
    return out


def _bech32_encode(hrp: str, data: bytes) -> str:
    """Encode like age: the case of `hrp` decides the case of the whole string."""
    lower = hrp.lower()
    words = _convert_bits(data, 8, 5, pad=True)
    check = _polymod(_hrp_expand(lower) + words + [0] * 6) ^ 1
    words += [check >> 5 * (5 - i) & 31 for i in range(6)]
    text = lower + "1" + "".join(_BECH32[w] for w in words)
    return text.upper() if hrp.isupper() else text


def _bech32_decode(text: str) -> tuple[str, bytes]:
    """Return (hrp as written, data); raise ValueError on any defect."""
    if text.lower() != text and text.upper() != text:
        raise ValueError("mixed case")
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text) or any(not 33 <= ord(c) <= 126 for c in text):
        raise ValueError("bad separator or characters")
    lower = text.lower()
    words = [_BECH32_INDEX[c] for c in lower[pos + 1 :] if c in _BECH32_INDEX]
    if len(words) != len(text) - pos - 1:
        raise ValueError("bad character")
    if _polymod(_hrp_expand(lower[:pos]) + words) != 1:
        raise ValueError("bad checksum")
    return text[:pos], bytes(_convert_bits(words[:-6], 5, 8, pad=False))


# --- keys --------------------------------------------------------------------------------


class Recipient:
    """An X25519 public key, written `age1...`: what a volume is encrypted to."""

    __slots__ = ("_public",)

    def __init__(self, public: X25519PublicKey) -> None:
        self._public = public

    @classmethod
    def parse(cls, text: str) -> Recipient:
        """Parse an `age1...` string as `age-keygen -y` prints it."""
        try:
            hrp, data = _bech32_decode(text.strip())
            if hrp != _PUBLIC_HRP or len(data) != 32:
                raise ValueError("not an X25519 recipient")
            return cls(X25519PublicKey.from_public_bytes(data))
        except ValueError:
            raise KeyFormatError(
                "not an age X25519 recipient: expected the `age1...` string that "
                "`age-keygen -y` prints for an identity"
            ) from None

    @property
    def public_bytes(self) -> bytes:
        return self._public.public_bytes_raw()

    def __str__(self) -> str:
        return _bech32_encode(_PUBLIC_HRP, self.public_bytes)

    def __repr__(self) -> str:
        return f"Recipient({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipient) and self.public_bytes == other.public_bytes

    def __hash__(self) -> int:
        return hash(self.public_bytes)

    def _wrap(self, file_key: bytes) -> bytes:
        """Return the `-> X25519` stanza that hands `file_key` to this recipient."""
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes_raw()
        try:
            secret = ephemeral.exchange(self._public)
        except ValueError:
            raise KeyFormatError("this recipient is a low-order point and cannot be used") from None
        wrapped = ChaCha20Poly1305(_wrap_key(secret, share, self.public_bytes)).encrypt(
            _ZERO_NONCE, file_key, None
        )
        return b"-> X25519 " + _b64encode(share) + b"\n" + _b64encode(wrapped) + b"\n"


class Identity:
    """An X25519 private key, written `AGE-SECRET-KEY-1...`: what decrypts a volume.

    Its repr shows only the recipient, so keys cannot leak into logs or tracebacks.
    """

    __slots__ = ("_private",)

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private

    @classmethod
    def generate(cls) -> Identity:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str) -> Identity:
        """Parse an `AGE-SECRET-KEY-1...` string as `age-keygen` writes it."""
        try:
            hrp, data = _bech32_decode(text.strip())
            if hrp != _SECRET_HRP or len(data) != 32:
                raise ValueError("not an X25519 identity")
            return cls(X25519PrivateKey.from_private_bytes(data))
        except ValueError:
            raise KeyFormatError(
                "not an age X25519 identity: expected an upper-case `AGE-SECRET-KEY-1...` "
                "line as `age-keygen` writes it"
            ) from None

    @property
    def recipient(self) -> Recipient:
        return Recipient(self._private.public_key())

    def __str__(self) -> str:
        return _bech32_encode(_SECRET_HRP, self._private.private_bytes_raw())

    def __repr__(self) -> str:
        return f"Identity(recipient={str(self.recipient)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and self.recipient == other.recipient

    def __hash__(self) -> int:
        return hash(self.recipient)

    def _unwrap(self, stanza: _Stanza) -> bytes | None:
        """Return the file key if `stanza` was made for this identity, else None.

        A malformed X25519 stanza is a header error whoever it was for, as the spec requires.
        """
        if len(stanza.args) != 2:
            raise HeaderError("an X25519 stanza must have exactly one argument, the share")
        share = _b64decode(stanza.args[1], "X25519 share")
        if len(share) != 32:
            raise HeaderError("the X25519 share in a stanza is not 32 bytes")
        if len(stanza.body) != FILE_KEY_SIZE + CHUNK_OVERHEAD:
            raise HeaderError("the wrapped file key in an X25519 stanza is not 32 bytes")
        try:
            secret = self._private.exchange(X25519PublicKey.from_public_bytes(share))
        except ValueError:
            raise HeaderError("an X25519 stanza has a low-order share (all-zero secret)") from None
        key = _wrap_key(secret, share, self.recipient.public_bytes)
        try:
            return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, stanza.body, None)
        except InvalidTag:
            return None


def _wrap_key(secret: bytes, share: bytes, recipient: bytes) -> bytes:
    return _hkdf(secret, share + recipient, _X25519_LABEL)


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


# --- identity files ----------------------------------------------------------------------


def load_identities(path: str | os.PathLike[str]) -> list[Identity]:
    """Read an identity file as `age-keygen` writes it: comments, blank lines, keys."""
    identities = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(Identity.parse(line))
        except KeyFormatError as exc:
            raise KeyFormatError(f"{path}, line {number}: {exc}") from None
    if not identities:
        raise KeyFormatError(f"{path} holds no `AGE-SECRET-KEY-1...` line")
    return identities


def write_identity(path: str | os.PathLike[str], identity: Identity) -> None:
    """Write `identity` in `age-keygen`'s layout to a new file of mode 0600.

    The key appears under `path` complete or not at all (temporary file, fsync, link), and an
    existing file is never replaced: losing an identity loses every backup made for it.
    """
    target = Path(path)
    now = datetime.datetime.now().astimezone().replace(microsecond=0).isoformat()
    text = (
        f"# created: {now.replace('+00:00', 'Z')}\n# public key: {identity.recipient}\n{identity}\n"
    )
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _link_no_replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _link_no_replace(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileExistsError:
        raise AgeError(f"{target} already exists; refusing to overwrite an identity") from None
    except OSError:  # a filesystem without hard links: rename, after a (racy) check
        if target.exists():
            raise AgeError(f"{target} already exists; refusing to overwrite an identity") from None
        os.rename(source, target)


# --- header ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stanza:
    args: list[bytes]
    body: bytes


@dataclass(frozen=True)
class _Header:
    stanzas: list[_Stanza]
    mac_input: bytes
    """The header bytes up to and including `---`, which the MAC covers."""
    mac: bytes
    length: int
    """Header bytes including the MAC line's newline; the payload nonce follows."""


def _b64encode(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _b64decode(text: bytes, what: str) -> bytes:
    """Decode unpadded, canonical base64 as the spec demands, or raise HeaderError."""
    try:
        if b"=" in text or len(text) % 4 == 1:
            raise ValueError
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (ValueError, binascii.Error):
        raise HeaderError(f"the {what} is not valid unpadded base64") from None
    if _b64encode(data) != text:
        raise HeaderError(f"the {what} is not canonical base64")
    return data


def _parse_header(data: bytes | bytearray | memoryview) -> _Header:
    """Parse the header at the start of `data`, raising IncompleteHeader if it ends first."""
    buf = bytes(data[:MAX_HEADER_SIZE])
    lines = _Lines(buf, len(data))
    version = lines.next()
    if version != _VERSION_LINE:
        _reject_first_line(version)
    stanzas = []
    while True:
        line = lines.next()
        if line.startswith(b"---"):
            return _finish_header(buf, lines, line, stanzas)
        if not line.startswith(b"-> "):
            raise HeaderError("malformed age header: expected a `-> ` stanza or the `---` line")
        stanzas.append(_Stanza(_parse_args(line[3:]), _parse_body(lines)))


def _reject_first_line(line: bytes) -> NoReturn:
    if line.startswith(b"-----BEGIN AGE ENCRYPTED FILE-----"):
        raise HeaderError("ASCII-armored age files are not supported: de-armor them first")
    if line.startswith(b"age-encryption.org/"):
        raise HeaderError("unsupported age format version: only v1 files can be read")
    raise HeaderError("not an age file: the first line is not `age-encryption.org/v1`")


def _finish_header(buf: bytes, lines: _Lines, line: bytes, stanzas: list[_Stanza]) -> _Header:
    if not stanzas:
        raise HeaderError("the age header has no recipient stanza")
    if not line.startswith(b"--- ") or len(line) != 47:
        raise HeaderError("the age header's MAC line is malformed")
    mac_start = lines.offset - len(line) - 1
    return _Header(stanzas, buf[: mac_start + 3], _b64decode(line[4:], "header MAC"), lines.offset)


def _parse_args(text: bytes) -> list[bytes]:
    args = text.split(b" ")
    if any(not arg or any(not 0x21 <= c <= 0x7E for c in arg) for arg in args):
        raise HeaderError("a stanza argument is empty or has characters outside ASCII 33-126")
    return args


def _parse_body(lines: _Lines) -> bytes:
    """Read body lines: full ones of 64 columns, then one shorter (possibly empty) line."""
    parts = []
    while True:
        line = lines.next()
        if len(line) > 64:
            raise HeaderError("a stanza body line is longer than 64 columns")
        parts.append(line)
        if len(line) < 64:
            return _b64decode(b"".join(parts), "stanza body")


class _Lines:
    """Newline-terminated lines of a header prefix; running out is IncompleteHeader."""

    def __init__(self, buf: bytes, available: int) -> None:
        self._buf = buf
        self._available = available
        self.offset = 0

    def next(self) -> bytes:
        end = self._buf.find(b"\n", self.offset)
        if end < 0:
            if self.offset == 0 and not _VERSION_LINE.startswith(self._buf):
                _reject_first_line(self._buf)
            if len(self._buf) >= MAX_HEADER_SIZE:
                raise HeaderError(f"the age header is larger than {MAX_HEADER_SIZE} bytes")
            raise IncompleteHeader(self._available)
        line = self._buf[self.offset : end]
        self.offset = end + 1
        return line


def _unwrap_file_key(header: _Header, identities: Sequence[Identity]) -> bytes:
    """Find the file key with `identities`, then check the header MAC with it."""
    for stanza in header.stanzas:
        if stanza.args[0] != b"X25519":
            continue
        for identity in identities:
            file_key = identity._unwrap(stanza)
            if file_key is not None:
                mac_key = _hkdf(file_key, b"", b"header")
                expected = hmac.digest(mac_key, header.mac_input, "sha256")
                if not hmac.compare_digest(expected, header.mac):
                    raise HeaderMacError(
                        "the age header MAC does not match: the file's header was altered "
                        "or damaged; do not trust this file"
                    )
                return file_key
    kinds = ", ".join(sorted({s.args[0].decode("ascii") for s in header.stanzas}))
    raise NoIdentityMatch(
        f"none of the {len(header.stanzas)} recipient stanza(s) ({kinds}) opens with the "
        f"{len(identities)} identity(ies) given: use the identity whose recipient the file "
        "was encrypted to"
    )


# --- payload -----------------------------------------------------------------------------


def ciphertext_offset(header_length: int, plaintext_offset: int) -> int:
    """Offset in the age file of the chunk holding `plaintext_offset`.

    Record it with the plaintext offset so a restore fetches from there.
    """
    if plaintext_offset < 0:
        raise ValueError("plaintext offsets are non-negative")
    return header_length + plaintext_offset // CHUNK_SIZE * ENCRYPTED_CHUNK_SIZE


def chunk_count(ciphertext_size: int, header_length: int) -> int:
    """How many STREAM chunks a complete age file of `ciphertext_size` bytes holds."""
    payload = ciphertext_size - header_length
    if payload < CHUNK_OVERHEAD:
        raise PayloadError("the file is shorter than its header plus one chunk: it is truncated")
    return max(1, -(-payload // ENCRYPTED_CHUNK_SIZE))


def is_final_chunk(ciphertext_size: int, header_length: int, index: int) -> bool:
    """Whether chunk `index` is the last one (flagged so) of a file of this size."""
    return index == chunk_count(ciphertext_size, header_length) - 1


def plaintext_size(ciphertext_size: int, header_length: int) -> int:
    """The plaintext length of a complete age file of `ciphertext_size` bytes."""
    count = chunk_count(ciphertext_size, header_length)
    return ciphertext_size - header_length - count * CHUNK_OVERHEAD


def ciphertext_size(header_length: int, plaintext_length: int) -> int:
    """The age file size for `plaintext_length` bytes of plaintext."""
    count = max(1, -(-plaintext_length // CHUNK_SIZE))
    return header_length + plaintext_length + count * CHUNK_OVERHEAD


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (_LAST if last else _NOT_LAST)


class PayloadKey:
    """The payload key of one age file, for decrypting any run of its chunks.

    `header_length` is where chunk 0 starts (header plus 16-byte payload nonce).
    """

    __slots__ = ("_aead", "header_length")

    def __init__(self, file_key: bytes, nonce: bytes, header_length: int) -> None:
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self.header_length = header_length

    def __repr__(self) -> str:
        return f"PayloadKey(header_length={self.header_length})"

    def decrypt_chunk(self, index: int, chunk: bytes | bytearray | memoryview, last: bool) -> bytes:
        """Decrypt one chunk (plaintext plus tag) given its index and final flag."""
        if len(chunk) < CHUNK_OVERHEAD or len(chunk) > ENCRYPTED_CHUNK_SIZE:
            raise PayloadError(f"chunk {index} is {len(chunk)} bytes: the file is truncated")
        if last and index and len(chunk) == CHUNK_OVERHEAD:
            raise PayloadError("the final chunk is empty, which the spec forbids after chunk 0")
        if not last and len(chunk) != ENCRYPTED_CHUNK_SIZE:
            raise PayloadError(f"chunk {index} is short but not the final one: truncated")
        try:
            return self._aead.decrypt(_nonce(index, last), chunk, None)
        except InvalidTag:
            raise PayloadError(
                f"chunk {index} fails authentication: the file was altered, damaged or "
                "truncated, or (for random access) the chunk index or final flag is wrong"
            ) from None

    def decrypt_chunks(
        self, first_index: int, ciphertext: bytes | bytearray | memoryview, is_last_included: bool
    ) -> bytes:
        """Decrypt consecutive whole chunks starting at chunk `first_index`.

        `ciphertext` is the file's bytes from `ciphertext_offset(...)` on, cut at a chunk
        boundary or at the end of the file (`is_last_included`, see `is_final_chunk`).
        """
        view = memoryview(ciphertext)
        if not view:
            raise PayloadError("no ciphertext given")
        count = -(-len(view) // ENCRYPTED_CHUNK_SIZE)
        out = []
        for n in range(count):
            piece = view[n * ENCRYPTED_CHUNK_SIZE : (n + 1) * ENCRYPTED_CHUNK_SIZE]
            last = is_last_included and n == count - 1
            out.append(self.decrypt_chunk(first_index + n, piece, last))
        return b"".join(out)


def open_header(
    prefix: bytes | bytearray | memoryview, identities: Sequence[Identity]
) -> PayloadKey:
    """Unwrap the payload key from the first bytes of an age file (e.g. its first 4 KiB).

    Raises IncompleteHeader when `prefix` ends before the header and nonce do.
    """
    header = _parse_header(prefix)
    file_key = _unwrap_file_key(header, identities)
    end = header.length + NONCE_SIZE
    if len(prefix) < end:
        raise IncompleteHeader(len(prefix))
    return PayloadKey(file_key, bytes(prefix[header.length : end]), end)


# --- streaming encryption ----------------------------------------------------------------


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int | None: ...


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class Encryptor:
    """A writable binary file that encrypts to `recipients` into `sink` as data arrives.

    The header and payload nonce are written at once (`header_length` bytes); then each 64 KiB
    of plaintext becomes a chunk, held back only until it is known whether more data follows.
    `close()` writes the final chunk. Leaving a `with` block on an exception does NOT: the
    output is then a truncated file that every reader rejects, never a silently short one.
    """

    def __init__(
        self, sink: _Writable, recipients: Iterable[Recipient], *, close_sink: bool = False
    ) -> None:
        recipients = list(recipients)
        if not recipients:
            raise AgeError("encrypting needs at least one recipient")
        file_key = secrets.token_bytes(FILE_KEY_SIZE)
        nonce = secrets.token_bytes(NONCE_SIZE)
        header = _VERSION_LINE + b"\n" + b"".join(r._wrap(file_key) for r in recipients) + b"---"
        mac = hmac.digest(_hkdf(file_key, b"", b"header"), header, "sha256")
        head = header + b" " + _b64encode(mac) + b"\n" + nonce
        self._sink = sink
        self._close_sink = close_sink
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self._pending = bytearray()
        self._index = 0
        self._size = 0
        self._closed = False
        self.header_length = len(head)
        _write_all(sink, head)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt `data`; a whole chunk is written out once a byte beyond it arrives."""
        if self._closed:
            raise ValueError("write to a closed Encryptor")
        view = memoryview(data).cast("B")
        size = len(view)
        pending = self._pending
        if pending:
            take = CHUNK_SIZE - len(pending)
            pending += view[:take]
            view = view[take:]
            if not view:
                self._size += size
                return size
            self._emit(pending, last=False)
            pending.clear()
        while len(view) > CHUNK_SIZE:
            self._emit(view[:CHUNK_SIZE], last=False)
            view = view[CHUNK_SIZE:]
        pending += view
        self._size += size
        return size

    def _emit(self, plaintext: bytes | bytearray | memoryview, last: bool) -> None:
        _write_all(self._sink, self._aead.encrypt(_nonce(self._index, last), plaintext, None))
        self._index += 1

    def tell(self) -> int:
        """Plaintext bytes written so far."""
        return self._size

    def close(self) -> None:
        """Write the final chunk; close the sink only if `close_sink` was given."""
        if self._closed:
            return
        self._closed = True
        self._emit(self._pending, last=True)
        self._pending = bytearray()
        self._finish_sink()

    def abort(self) -> None:
        """Stop without a final chunk, leaving output that no reader accepts as complete."""
        self._closed = True
        self._pending = bytearray()
        self._finish_sink()

    def _finish_sink(self) -> None:
        flush = getattr(self._sink, "flush", None)
        if flush is not None:
            flush()
        if self._close_sink:
            self._sink.close()  # type: ignore[attr-defined]

    def flush(self) -> None:
        """Flush the sink; the last partial chunk stays buffered until close()."""
        flush = getattr(self._sink, "flush", None)
        if flush is not None:
            flush()

    @property
    def closed(self) -> bool:
        return self._closed

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def __enter__(self) -> Encryptor:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _write_all(sink: _Writable, data: bytes) -> None:
    written = sink.write(data)
    if written is not None and written < len(data):  # a raw sink may write less
        view = memoryview(data)[written:]
        while view:
            n = sink.write(view)  # type: ignore[arg-type]
            view = view[n if n is not None else len(view) :]


# --- streaming decryption ----------------------------------------------------------------


class Decryptor:
    """A readable binary file that decrypts an age file from `source` while checking it.

    The header is parsed, a file key unwrapped and the MAC checked on construction. Reading
    then releases each chunk only after its tag verifies, and raises PayloadError where the
    file is truncated, altered, lacks its final chunk, or goes on after it.
    """

    def __init__(self, source: _Readable, identities: Sequence[Identity]) -> None:
        self._source = source
        head = bytearray()
        while True:
            try:
                key = open_header(head, identities)
                break
            except IncompleteHeader:
                block = source.read(_READ_BLOCK)
                if not block:
                    raise HeaderError(
                        "the file ends inside the age header: it is truncated or not age"
                    ) from None
                head += block
        self._key = key
        self.header_length = key.header_length
        self._carry = head[key.header_length :]
        self._chunk = bytearray(ENCRYPTED_CHUNK_SIZE)
        self._plain = b""
        self._pos = 0
        self._index = 0
        self._done = False
        self._error: PayloadError | None = None
        self.closed = False

    def _next_chunk(self) -> None:
        """Decrypt the next chunk into the read buffer, or record the reason it cannot be."""
        view = memoryview(self._chunk)
        got = len(self._carry)
        view[:got] = self._carry
        self._carry = b""
        got += _read_into(self._source, view[got:])
        index = self._index
        if got == ENCRYPTED_CHUNK_SIZE:  # full: most likely not last, but it may be
            try:
                plain, last = self._key.decrypt_chunk(index, view, last=False), False
            except PayloadError:
                plain, last = self._key.decrypt_chunk(index, view, last=True), True
        elif got == 0 and index == 0:
            raise PayloadError("the file ends right after its header: it has no payload")
        elif got == 0:
            raise PayloadError("the file ends without its final chunk: it is truncated")
        else:  # a short read only happens at the end of the file
            plain, last = self._key.decrypt_chunk(index, view[:got], last=True), True
        self._plain, self._pos, self._index = plain, 0, index + 1
        if last:
            self._done = True
            if got == ENCRYPTED_CHUNK_SIZE and _read_into(self._source, memoryview(bytearray(1))):
                self._error = PayloadError("there is data after the final chunk of the file")

    def _available(self) -> int:
        """Bytes ready in the read buffer, decrypting the next chunk when it is empty."""
        if self.closed:
            raise ValueError("read from a closed Decryptor")
        while self._pos == len(self._plain):
            if self._error is not None:
                raise self._error
            if self._done:
                return 0
            try:
                self._next_chunk()
            except PayloadError as exc:
                self._error = exc
                raise
        return len(self._plain) - self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Copy out at most the rest of the current chunk; 0 only at the end of the file.

        Everything it hands out has been authenticated; a short count is not the end.
        """
        out = memoryview(buffer).cast("B")
        n = min(len(out), self._available())
        out[:n] = self._plain[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        """Read `size` bytes (all when negative); fewer only at the end of the file.

        Any defect raises, even after part of the bytes asked for had verified, so that a
        short result always means the complete, authenticated end of the file.
        """
        parts: list[bytes] = []
        while size:
            ready = self._available()
            if not ready:
                break
            n = ready if size < 0 else min(ready, size)
            start = self._pos
            part = self._plain if n == len(self._plain) else self._plain[start : start + n]
            parts.append(part)
            self._pos += n
            size -= n if size > 0 else 0
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> Decryptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_into(source: _Readable, view: memoryview) -> int:
    """Fill `view` from `source` as far as it goes before end of file."""
    readinto = getattr(source, "readinto", None)
    got = 0
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got:])
        else:
            block = source.read(len(view) - got)
            n = len(block)
            view[got : got + n] = block
        if not n:
            break
        got += n
    return got


# --- conveniences ------------------------------------------------------------------------


class _Buffer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(data)
        return len(data)


def encrypt_bytes(plaintext: bytes, recipients: Iterable[Recipient]) -> bytes:
    """Encrypt `plaintext` whole to `recipients`."""
    sink = _Buffer()
    with Encryptor(sink, recipients) as encryptor:
        encryptor.write(plaintext)
    return b"".join(sink.parts)


def decrypt_bytes(ciphertext: bytes, identities: Sequence[Identity]) -> bytes:
    """Decrypt a whole age file held in memory."""
    return Decryptor(io.BytesIO(ciphertext), identities).read()
