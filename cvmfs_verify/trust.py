"""The chain of trust a client checks before using a revision (spec §3, §4, §5, §10).

Manifest first: fields, printed hash, and signature with the public key of the certificate object
``X``; then the whitelist: signed by a master key, not expired, same repository name, listing the
certificate's fingerprint. Every problem is reported through ``add(where, what)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from cvmfs_verify import signature
from cvmfs_verify.fetch import (
    BadObjectError,
    FetchError,
    NotFoundError,
    Source,
    fetch_object,
    read,
)
from cvmfs_verify.hashes import SUFFIX_CERTIFICATE
from cvmfs_verify.letters import LetterError, Manifest, parse_manifest, parse_whitelist

MANIFEST = ".cvmfspublished"
WHITELIST = ".cvmfswhitelist"
Add = Callable[[str, str], None]


@dataclass(frozen=True)
class Chain:
    """What the chain check established (None where it could not get that far)."""

    manifest: Manifest | None
    certificate: x509.Certificate | None


def check_chain(source: Source, keys: list[rsa.RSAPublicKey], *, repo: str | None,
                now: float | None, add: Add) -> Chain:
    """Read and check manifest, certificate and whitelist; report problems through ``add``."""
    manifest = _manifest(source, repo, add)
    if manifest is None:
        return Chain(None, None)
    certificate = _certificate(source, manifest, add)
    _whitelist(source, manifest, certificate, keys, time.time() if now is None else now, add)
    return Chain(manifest, certificate)


def _manifest(source: Source, repo: str | None, add: Add) -> Manifest | None:
    where = f"manifest {MANIFEST}"
    try:
        manifest = parse_manifest(read(source, MANIFEST, fresh=False))
    except NotFoundError:
        add(where, "missing")
        return None
    except (FetchError, LetterError) as err:
        add(where, f"cannot read: {err}")
        return None
    for text in manifest.problems:
        add(where, text)
    if repo and manifest.name != repo:
        add(where, f"repository name N is {manifest.name!r}, expected {repo!r}")
    if manifest.letter is not None and (problem := signature.check_letter_hash(manifest.letter)):
        add(where, problem)
    return manifest


def _certificate(source: Source, manifest: Manifest, add: Add) -> x509.Certificate | None:
    cert_hash = manifest.hash("X")
    if cert_hash is None:
        return None
    where = f"certificate {cert_hash.object_path(SUFFIX_CERTIFICATE)}"
    try:
        certificate = signature.load_certificate(
            fetch_object(source, cert_hash, SUFFIX_CERTIFICATE))
    except (NotFoundError, BadObjectError, FetchError) as err:
        add(where, f"cannot load: {'missing' if isinstance(err, NotFoundError) else err}")
        return None
    except ValueError as err:
        add(where, f"not an X.509 certificate ({err})")
        return None
    if manifest.letter is not None and (
            problem := signature.check_manifest_signature(manifest.letter, certificate)):
        add(f"manifest {MANIFEST}", problem)
    return certificate


def _whitelist(source: Source, manifest: Manifest, certificate: x509.Certificate | None,
               keys: list[rsa.RSAPublicKey], now: float, add: Add) -> None:
    where = f"whitelist {WHITELIST}"
    try:
        whitelist = parse_whitelist(read(source, WHITELIST))
    except NotFoundError:
        add(where, "missing")
        return
    except (FetchError, LetterError) as err:
        add(where, f"cannot read: {err}")
        return
    for text in whitelist.problems:
        add(where, text)
    if whitelist.letter is not None:
        if problem := signature.check_letter_hash(whitelist.letter):
            add(where, problem)
        if problem := signature.check_whitelist_signature(whitelist.letter, keys):
            add(where, problem)
    if whitelist.pkcs7:
        add(where, "PKCS#7 whitelists (Vpkcs7) are not supported by this verifier")
    # clients compare at hour granularity: expired from the first second of the expiry's hour
    if whitelist.expires is not None and now // 3600 >= whitelist.expires // 3600:
        expired = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(whitelist.expires))
        add(where, f"expired at {expired}")
    if whitelist.name is not None and whitelist.name != manifest.name:
        add(where, f"repository name is {whitelist.name!r}, the manifest's N is "
                   f"{manifest.name!r}")
    if certificate is not None and not signature.listed(certificate, whitelist.fingerprints):
        add(where, f"certificate fingerprint {signature.fingerprint(certificate)} is not listed")
