"""The signed letters of a stratum 0: the manifest ``.cvmfspublished`` and ``.cvmfswhitelist``.

Both are "letters": field lines, a ``--`` line, the hex SHA-1 of everything before ``--`` and
then raw signature bytes to the end of the file. The manifest is signed with the repository key
(RSA PKCS#1 v1.5 over SHA-1 of the *hex string*, ``EVP_SignInit(EVP_sha1())``); the whitelist is
signed with the master key by a raw private-key operation on the PKCS#1 type-1 padded hex
string, without DigestInfo (``openssl pkeyutl -sign``, ``RSA_private_encrypt``).
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ROOT_PATH_MD5 = "d41d8cd98f00b204e9800998ecf8427e"  # md5 of the root path "", always
_STAMP = "%Y%m%d%H%M%S"


class LetterError(ValueError):
    """A letter that cannot be parsed or whose signature does not verify."""


@dataclass(frozen=True)
class Manifest:
    """The fields of ``.cvmfspublished`` (hashes: hex without suffix)."""

    root_catalog: str
    catalog_size: int
    ttl: int
    revision: int
    fqrn: str
    certificate: str
    history: str
    timestamp: int
    metainfo: str
    reflog: str
    garbage_collectable: bool = True
    alternative_name: bool = False

    def lines(self) -> bytes:
        """The unsigned body, in the order cvmfs writes it (C B R D S G A N X H T M Y)."""
        yes = {True: "yes", False: "no"}
        fields = [("C", self.root_catalog), ("B", str(self.catalog_size)), ("R", ROOT_PATH_MD5),
                  ("D", str(self.ttl)), ("S", str(self.revision)),
                  ("G", yes[self.garbage_collectable]), ("A", yes[self.alternative_name]),
                  ("N", self.fqrn), ("X", self.certificate), ("H", self.history),
                  ("T", str(self.timestamp)), ("M", self.metainfo), ("Y", self.reflog)]
        return "".join(f"{k}{v}\n" for k, v in fields).encode()

    @classmethod
    def parse(cls, body: bytes) -> Manifest:
        """Read the fields of a manifest body (the part before ``--``)."""
        values: dict[str, str] = {}
        for line in body.decode("ascii").splitlines():
            if line == "--":
                break
            if line:
                values[line[0]] = line[1:]
        try:
            return cls(root_catalog=values["C"], catalog_size=int(values.get("B", "0")),
                       ttl=int(values.get("D", "240")), revision=int(values["S"]),
                       fqrn=values.get("N", ""), certificate=values.get("X", ""),
                       history=values.get("H", ""), timestamp=int(values.get("T", "0")),
                       metainfo=values.get("M", ""), reflog=values.get("Y", ""),
                       garbage_collectable=values.get("G") == "yes",
                       alternative_name=values.get("A") == "yes")
        except (KeyError, ValueError) as err:
            raise LetterError(f"malformed manifest: {err}") from None


def split_letter(data: bytes) -> tuple[bytes, str, bytes]:
    """(body including its last newline, printed hash, signature) of a signed letter."""
    pos = 0 if data.startswith(b"--\n") else data.find(b"\n--\n") + 1
    if pos <= 0 and not data.startswith(b"--\n"):
        raise LetterError("no signature block (missing '--' line)")
    body = data[:pos]
    rest = data[pos + 3:]
    printed, newline, signature = rest.partition(b"\n")
    if not newline:
        raise LetterError("truncated signature block")
    return body, printed.decode("ascii", "replace"), signature


def body_hash(body: bytes) -> str:
    """The hex SHA-1 printed under ``--``."""
    return hashlib.sha1(body).hexdigest()  # noqa: S324 (the format's letter hash)


def sign_manifest(manifest: Manifest, key: rsa.RSAPrivateKey) -> bytes:
    """The complete ``.cvmfspublished``."""
    body = manifest.lines()
    printed = body_hash(body).encode()
    signature = key.sign(printed, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303 (format)
    return body + b"--\n" + printed + b"\n" + signature


def verify_manifest(data: bytes, certificate_pem: bytes) -> Manifest:
    """Check hash and signature against the certificate's key; return the manifest."""
    body, printed, signature = split_letter(data)
    if printed != body_hash(body):
        raise LetterError("manifest hash does not match its content")
    public = x509.load_pem_x509_certificate(certificate_pem).public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise LetterError("certificate key is not RSA")
    try:
        public.verify(signature, printed.encode(), padding.PKCS1v15(), hashes.SHA1())  # noqa: S303
    except Exception as err:
        raise LetterError("manifest signature does not verify") from err
    return Manifest.parse(body)


def fingerprint(certificate_pem: bytes) -> str:
    """``AA:BB:...`` SHA-1 fingerprint of the certificate's DER form (openssl -fingerprint)."""
    der = x509.load_pem_x509_certificate(certificate_pem).public_bytes(
        serialization.Encoding.DER)
    digest = hashlib.sha1(der).hexdigest().upper()  # noqa: S324 (the format's fingerprint)
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def whitelist_body(fqrn: str, fingerprints: list[str], now: datetime.datetime,
                   lifetime: datetime.timedelta) -> bytes:
    """The unsigned whitelist: creation time, ``E`` expiry, ``N`` name, fingerprints."""
    expires = now + lifetime
    lines = [now.strftime(_STAMP), "E" + expires.strftime(_STAMP), "N" + fqrn, *fingerprints]
    return "".join(f"{line}\n" for line in lines).encode()


def _raw_private(key: rsa.RSAPrivateKey, message: bytes) -> bytes:
    """RSA_private_encrypt(message, RSA_PKCS1_PADDING): type-1 padding, no DigestInfo."""
    numbers = key.private_numbers()
    n = numbers.public_numbers.n
    k = (n.bit_length() + 7) // 8
    if len(message) > k - 11:
        raise ValueError("message too long for the key")
    block = b"\x00\x01" + b"\xff" * (k - 3 - len(message)) + b"\x00" + message
    m = int.from_bytes(block, "big")
    # CRT: s = m^d mod n
    s1 = pow(m, numbers.dmp1, numbers.p)
    s2 = pow(m, numbers.dmq1, numbers.q)
    h = (numbers.iqmp * (s1 - s2)) % numbers.p
    s = s2 + h * numbers.q
    if pow(s, numbers.public_numbers.e, n) != m:  # guard against a faulty computation
        raise ValueError("RSA signature self-check failed")
    return s.to_bytes(k, "big")


def sign_whitelist(body: bytes, master_key: rsa.RSAPrivateKey) -> bytes:
    """The complete ``.cvmfswhitelist``."""
    printed = body_hash(body).encode()
    return body + b"--\n" + printed + b"\n" + _raw_private(master_key, printed)


def verify_whitelist(data: bytes, master_public: rsa.RSAPublicKey) -> bytes:
    """Check the whitelist's hash and master signature; return its body."""
    body, printed, signature = split_letter(data)
    if printed != body_hash(body):
        raise LetterError("whitelist hash does not match its content")
    try:
        recovered = master_public.recover_data_from_signature(signature, padding.PKCS1v15(), None)
    except Exception as err:
        raise LetterError("whitelist signature does not verify") from err
    if recovered != printed.encode():
        raise LetterError("whitelist signature does not match its hash")
    return body


@dataclass(frozen=True)
class Whitelist:
    """The parsed fields of a whitelist body."""

    created: datetime.datetime
    expires: datetime.datetime
    fqrn: str
    fingerprints: tuple[str, ...]

    @classmethod
    def parse(cls, body: bytes) -> Whitelist:
        """Read a whitelist body (LetterError if malformed)."""
        lines = body.decode("ascii", "replace").splitlines()
        try:
            created = _utc(lines[0])
            expires = _utc(lines[1][1:]) if lines[1].startswith("E") else None
            fqrn = lines[2][1:] if lines[2].startswith("N") else None
        except (IndexError, ValueError):
            raise LetterError("malformed whitelist header") from None
        if expires is None or fqrn is None:
            raise LetterError("malformed whitelist header")
        prints = tuple(line.split()[0].split("#")[0] for line in lines[3:]
                       if line and line[0] not in "VW" and line.split()[0].split("#")[0])
        return cls(created, expires, fqrn, prints)


def _utc(text: str) -> datetime.datetime:
    if len(text) != 14:
        raise ValueError(text)
    return datetime.datetime.strptime(text, _STAMP).replace(tzinfo=datetime.UTC)
