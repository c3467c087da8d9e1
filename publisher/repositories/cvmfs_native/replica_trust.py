"""The chain of trust a replica checks before it takes a revision, exactly as a client does.

``.cvmfspublished`` is fetched and parsed; its repository name and root-path hash must be ours;
the certificate object ``X`` it names is fetched by hash (or read from the replica, where it was
stored hash-checked) and the manifest's signature is verified with the certificate's key; then
``.cvmfswhitelist`` must be signed by the origin's master key, name the repository, be
unexpired, and list the certificate's fingerprint.
"""

from __future__ import annotations

import datetime
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from publisher.repositories.cvmfs_native.fetch import Fetcher
from publisher.repositories.cvmfs_native.layout import MANIFEST, WHITELIST
from publisher.repositories.cvmfs_native.manifest import (
    ROOT_PATH_MD5,
    LetterError,
    Manifest,
    Whitelist,
    fingerprint,
    split_letter,
    verify_manifest,
    verify_whitelist,
)
from publisher.repositories.cvmfs_native.objects import CERTIFICATE, ObjectStore, object_digest
from userpub.errors import ServiceError

SHA1_HEX = re.compile(r"[0-9a-f]{40}")


class ReplicaError(ServiceError):
    """A pull that cannot go on (untrusted, inconsistent or unreachable origin, local I/O)."""


@dataclass(frozen=True)
class Ensemble:
    """A verified manifest with what it was verified by (all bytes exactly as served)."""

    raw: bytes  # .cvmfspublished
    manifest: Manifest
    certificate: bytes  # the X object, as stored (compressed)
    whitelist: bytes  # .cvmfswhitelist


def load_master_key(path: Path) -> rsa.RSAPublicKey:
    """The origin's master public key (PEM), or ReplicaError."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ReplicaError(f"master public key {path} is missing") from None
    except (OSError, ValueError) as err:
        raise ReplicaError(f"master public key {path} is unreadable: {err}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ReplicaError(f"master public key {path} is not an RSA key")
    return key


def _fields(body: bytes) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in body.decode("ascii", "replace").splitlines():
        if line:
            values.setdefault(line[0], line[1:])
    return values


def fetch_ensemble(fetcher: Fetcher, fqrn: str, master: rsa.RSAPublicKey, store: ObjectStore,
                   now: datetime.datetime) -> Ensemble:
    """Fetch and verify manifest, certificate and whitelist; ReplicaError says what failed."""
    where = fetcher.base_url
    raw = fetcher.get(MANIFEST)
    try:
        body, _, _ = split_letter(raw)
        unsigned = Manifest.parse(body)
    except (LetterError, UnicodeDecodeError) as err:
        raise ReplicaError(f"{where}/{MANIFEST}: {err}") from None
    fields = _fields(body)
    if unsigned.fqrn != fqrn:
        raise ReplicaError(f"{where}/{MANIFEST} is the manifest of {unsigned.fqrn!r}, not of "
                           f"{fqrn}")
    if fields.get("R", ROOT_PATH_MD5) != ROOT_PATH_MD5:
        raise ReplicaError(f"{where}/{MANIFEST}: root path hash R is not the root's")
    for letter, value in (("C", unsigned.root_catalog), ("X", unsigned.certificate),
                          ("H", unsigned.history), ("M", unsigned.metainfo),
                          ("Y", unsigned.reflog)):
        if (value or letter in "CX") and not SHA1_HEX.fullmatch(value):
            raise ReplicaError(f"{where}/{MANIFEST}: field {letter} {value!r} is not a SHA-1 "
                               "hash (other hash algorithms are not replicated)")
    stored = _certificate(fetcher, store, unsigned.certificate)
    try:
        pem = zlib.decompress(stored)
        manifest = verify_manifest(raw, pem)
    except zlib.error as err:
        raise ReplicaError(f"certificate object {unsigned.certificate}X does not inflate: "
                           f"{err}") from None
    except (LetterError, ValueError) as err:
        raise ReplicaError(f"{where}/{MANIFEST}: {err}") from None
    whitelist = fetcher.get(WHITELIST)
    try:
        listed = Whitelist.parse(verify_whitelist(whitelist, master))
    except LetterError as err:
        raise ReplicaError(f"{where}/{WHITELIST}: {err} (with the master key configured for "
                           f"{fqrn})") from None
    if listed.fqrn != fqrn:
        raise ReplicaError(f"{where}/{WHITELIST} is the whitelist of {listed.fqrn!r}, not of "
                           f"{fqrn}")
    if listed.expires <= now:
        raise ReplicaError(f"{where}/{WHITELIST} expired at {listed.expires:%Y-%m-%d %H:%M} UTC")
    wanted = fingerprint(pem).upper()
    if wanted not in (f.upper() for f in listed.fingerprints):
        raise ReplicaError(f"{where}/{WHITELIST} does not list the certificate that signed the "
                           f"manifest ({wanted})")
    return Ensemble(raw, manifest, stored, whitelist)


def _certificate(fetcher: Fetcher, store: ObjectStore, digest: str) -> bytes:
    """The stored X object: the replica's copy if it has one, else fetched and hash-checked."""
    local = store.path(digest, CERTIFICATE)
    try:
        data = local.read_bytes()
    except FileNotFoundError:
        data = b""
    if data and object_digest(data).hex() == digest:
        return data
    name = f"data/{digest[:2]}/{digest[2:]}{CERTIFICATE}"
    data = fetcher.get(name, fresh=False)
    if object_digest(data).hex() != digest:
        raise ReplicaError(f"{fetcher.url(name)}: content does not hash to its name")
    return data
