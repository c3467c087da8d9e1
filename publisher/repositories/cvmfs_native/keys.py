"""Repository keys in the layout cvmfs_server uses (``/etc/cvmfs/keys``), made or loaded here.

For repository ``<fqrn>`` the key directory holds:

* ``<fqrn>.masterkey`` - the master key (RSA 2048, PEM); it signs the whitelist.
* ``<fqrn>.pub``       - the master public key; clients trust it (distributed out of band).
* ``<fqrn>.key``       - the repository key; it signs every manifest.
* ``<fqrn>.crt``       - a self-signed X.509 certificate of the repository key (its envelope);
  the whitelist lists its SHA-1 fingerprint and the manifest names it (object ``...X``).

Private keys are written 0600, in PKCS#8 PEM like ``openssl genpkey`` (cvmfs reads both).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from userpub.errors import ServiceError

KEY_BITS = 2048
CERT_DAYS = 3650


class KeysError(ServiceError):
    """Keys are missing, unreadable or would be overwritten; ``str()`` says which."""


@dataclass(frozen=True)
class KeyFiles:
    """The four files of a repository's keys."""

    directory: Path
    fqrn: str

    @property
    def master_key(self) -> Path:
        """``<fqrn>.masterkey``."""
        return self.directory / f"{self.fqrn}.masterkey"

    @property
    def master_public(self) -> Path:
        """``<fqrn>.pub``."""
        return self.directory / f"{self.fqrn}.pub"

    @property
    def repository_key(self) -> Path:
        """``<fqrn>.key``."""
        return self.directory / f"{self.fqrn}.key"

    @property
    def certificate(self) -> Path:
        """``<fqrn>.crt``."""
        return self.directory / f"{self.fqrn}.crt"

    def all(self) -> tuple[Path, ...]:
        """Every file, in creation order."""
        return (self.master_key, self.master_public, self.repository_key, self.certificate)


@dataclass(frozen=True)
class Keys:
    """Loaded keys: the master key may be absent (kept offline); then no whitelist re-signing."""

    repository_key: rsa.RSAPrivateKey
    certificate_pem: bytes
    master_key: rsa.RSAPrivateKey | None

    @property
    def certificate(self) -> x509.Certificate:
        """The parsed certificate."""
        return x509.load_pem_x509_certificate(self.certificate_pem)


def _pem_private(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def make_certificate(key: rsa.RSAPrivateKey, fqrn: str,
                     now: datetime.datetime | None = None) -> bytes:
    """A self-signed certificate (PEM) for the repository key, as cvmfs_server makes one."""
    now = now or datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                         f"{fqrn} CernVM-FS Release Managers")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def init_keys(directory: Path, fqrn: str) -> KeyFiles:
    """Create the master key, repository key and certificate; refuse to overwrite any."""
    files = KeyFiles(directory, fqrn)
    existing = [str(p) for p in files.all() if p.exists()]
    if existing:
        raise KeysError(f"keys of {fqrn} exist already: {', '.join(existing)}")
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    master = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    repo_key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    _write(files.master_key, _pem_private(master), 0o600)
    _write(files.master_public, master.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
    _write(files.repository_key, _pem_private(repo_key), 0o600)
    _write(files.certificate, make_certificate(repo_key, fqrn), 0o644)
    return files


def load_keys(files: KeyFiles) -> Keys:
    """Read the keys; the master key is optional."""
    try:
        repo_key = serialization.load_pem_private_key(files.repository_key.read_bytes(), None)
        cert_pem = files.certificate.read_bytes()
        x509.load_pem_x509_certificate(cert_pem)
        master = None
        if files.master_key.exists():
            master = serialization.load_pem_private_key(files.master_key.read_bytes(), None)
    except FileNotFoundError as err:
        raise KeysError(f"{err.filename} is missing: run `userpub keys init {files.fqrn}`") from None
    except (OSError, ValueError) as err:
        raise KeysError(f"cannot load the keys of {files.fqrn} from {files.directory}: {err}"
                        ) from None
    if not isinstance(repo_key, rsa.RSAPrivateKey) or (
            master is not None and not isinstance(master, rsa.RSAPrivateKey)):
        raise KeysError(f"the keys of {files.fqrn} are not RSA keys")
    return Keys(repo_key, cert_pem, master)
