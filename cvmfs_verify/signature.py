"""Signature checks of the manifest and the whitelist (spec §3, §5) with ``cryptography``.

- The printed hash after ``--`` must equal the hash of every byte before the ``--`` line.
- Manifest: RSA PKCS#1 v1.5 with SHA-1 DigestInfo over the ASCII hash text, repository key
  (the public key of the certificate object ``X``).
- Whitelist: raw PKCS#1 type-1 "encryption" of the ASCII hash text with the master key (no
  DigestInfo): recovering it with a master public key must give the hash text back.
- The certificate's fingerprint (SHA-1 over DER, ``AA:BB:...`` uppercase; ``-RMD160``/``-SHAKE128``
  appended for other algorithms) must be listed in the whitelist.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cvmfs_verify.hashes import ContentHash, HashError, digest
from cvmfs_verify.letters import SignedLetter


class MasterKeyError(ValueError):
    """A master key file that cannot be used."""


def load_master_keys(paths: list[Path]) -> list[rsa.RSAPublicKey]:
    """RSA public keys from PEM files (``PUBLIC KEY`` or ``RSA PUBLIC KEY``), as clients trust them."""
    keys: list[rsa.RSAPublicKey] = []
    for path in paths:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except OSError as err:
            raise MasterKeyError(f"{path}: {err.strerror}") from None
        except (ValueError, UnsupportedAlgorithm):
            raise MasterKeyError(f"{path}: not a PEM public key") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise MasterKeyError(f"{path}: not an RSA public key")
        keys.append(key)
    return keys


def check_letter_hash(letter: SignedLetter) -> str | None:
    """A problem when the printed hash is not the hash of the body, else None."""
    try:
        printed = ContentHash.parse(letter.hash_text)
    except HashError:
        return f"the line after '--' is not a hash: {letter.hash_text!r}"
    try:
        actual = digest(letter.body, printed.algorithm)
    except HashError as err:
        return str(err)
    if actual != printed:
        return f"printed hash {printed} is not the hash of the fields above '--' ({actual})"
    return None


def load_certificate(pem: bytes) -> x509.Certificate:
    """The PEM X.509 certificate of the ``X`` object, as clients load it; ValueError otherwise."""
    return x509.load_pem_x509_certificate(pem)


def check_manifest_signature(letter: SignedLetter, certificate: x509.Certificate) -> str | None:
    """A problem when the manifest's signature does not verify with the certificate's key."""
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return "the certificate's public key is not RSA"
    if not letter.signature:
        return "the signature after the hash line is empty"
    try:
        key.verify(letter.signature, letter.hash_text.encode("ascii"), padding.PKCS1v15(),
                   hashes.SHA1())  # noqa: S303 (the format mandates SHA-1, spec §3)
    except InvalidSignature:
        return "signature does not verify with the certificate's public key (object X)"
    return None


def check_whitelist_signature(letter: SignedLetter, keys: list[rsa.RSAPublicKey]) -> str | None:
    """A problem when no master key recovers the whitelist's hash text from its signature."""
    if not letter.signature:
        return "the signature after the hash line is empty"
    for key in keys:
        try:
            recovered = key.recover_data_from_signature(letter.signature, padding.PKCS1v15(), None)
        except (InvalidSignature, ValueError):
            continue
        if recovered == letter.hash_text.encode("ascii"):
            return None
    return "signature does not verify with the master key (--key)"


def fingerprint(certificate: x509.Certificate, algorithm: str = "sha1") -> str:
    """The certificate fingerprint as listed in whitelists."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    text = ":".join(f"{b:02X}" for b in bytes.fromhex(digest(der, algorithm).hex))
    return text + {"sha1": "", "rmd160": "-RMD160", "shake128": "-SHAKE128"}[algorithm]


def listed(certificate: x509.Certificate, fingerprints: tuple[str, ...]) -> bool:
    """True when the certificate's fingerprint (in any listed algorithm) is in ``fingerprints``."""
    for entry in fingerprints:
        algorithm = ("rmd160" if entry.endswith("-RMD160")
                     else "shake128" if entry.endswith("-SHAKE128") else "sha1")
        try:
            if fingerprint(certificate, algorithm) == entry:
                return True
        except HashError:
            continue
    return False
