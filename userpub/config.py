"""Configuration: one TOML file, loaded once into frozen dataclasses and validated at startup.

``load_config(path)`` returns a :class:`Config` or raises :class:`ConfigError`, whose
``problems`` are one line each (the CLI prints each as ``fatal: ...`` and exits 1).
Relative paths are relative to the configuration file's directory. Unknown keys are errors,
so a typo is found at startup rather than at 3 am.

To add a key: add a field (with its default) to the section's dataclass, read it in the
section's ``_parse_*`` function, and document it in ``docs/configuration.md``.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_CONFIG_PATH = Path("/etc/userpub/userpub.toml")
BACKENDS = ("local", "cvmfs-server", "cvmfs-native")
GIB = 1024**3

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: this host and its working directories."""

    name: str
    spool: Path = Path("var/spool")
    state: Path = Path("var/state")
    prefix: str = "sw"
    stamps: str = "ts"
    replica_interval: float = 15.0  # seconds between two pulls of each replica kept here


@dataclass(frozen=True)
class RepositoryConfig:
    """One ``[[repository]]``: where CIDs are published."""

    name: str
    host: str
    backend: str = "local"
    root: Path | None = None
    mount: str = ""
    replica: Path | None = None
    command_timeout: float = 1800.0
    cvmfs_ingest: bool = False  # cvmfs-server: stream tarballs into `cvmfs_server ingest`
    keys: Path | None = None  # cvmfs-native: key directory (default <state>/keys)
    whitelist_days: int = 30  # cvmfs-native: lifetime of a signed whitelist
    gc_keep_hours: float = 24.0  # cvmfs-native: gc keeps revisions younger than this
    origin: str | None = None  # replica: the origin's stratum-0 URL (http://host/cvmfs/<name>)
    master_key: Path | None = None  # replica: the origin's master public key

    def is_hosted_on(self, server_name: str) -> bool:
        """True when the server named ``server_name`` publishes into this repository."""
        return self.host == server_name


@dataclass(frozen=True)
class PublisherConfig:
    """``[publisher]``: batching, limits of an unpacked tarball, wake-up and retries."""

    batch_max_entries: int = 64
    batch_max_bytes: int = 8 * GIB
    rescan_seconds: float = 10.0
    max_members: int = 1_000_000
    max_unpacked_bytes: int = 16 * GIB
    max_attempts: int = 5
    durable: bool = True
    observer: str = "inotify"


CHECK_UPLOADS = ("full", "head", "off")


@dataclass(frozen=True)
class IngestConfig:
    """``[ingest]``: the HTTPS publication API."""

    listen: str = "0.0.0.0:443"
    http_listen: str | None = None
    certificate: Path = Path("/etc/grid-security/hostcert.pem")
    key: Path = Path("/etc/grid-security/hostkey.pem")
    ca_dir: Path = Path("/etc/grid-security/certificates")
    grid_mapfile: Path = Path("/etc/grid-security/grid-mapfile")
    token_issuers: tuple[str, ...] = ()
    token_audiences: tuple[str, ...] = ()
    token_keys: tuple[tuple[str, Path], ...] = ()
    max_upload_bytes: int = 4 * GIB
    allow_limited_proxies: bool = False
    crl_check: bool = False
    context_reload_seconds: float = 3600.0
    spool_reserve_bytes: int = 10 * GIB
    threads: int = 32
    socket_timeout: float = 60.0
    localhost_trusted: bool = False
    # CID group (first component) -> who may publish there: grid-mapfile accounts, token
    # subjects, or WLCG groups ("/dune", from a token's wlcg.groups); groups not named: anyone
    group_publishers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # an authenticated exists answering PRESENT stamps the CID, at most once per interval
    stamp_on_exists: bool = True
    stamp_on_exists_seconds: float = 3600.0
    # judge each upload's tar stream while it arrives (a bad tarball fails the POST): "full",
    # "head" (the first 8 MiB of every upload) or "off"
    check_uploads: str = "full"
    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    idle_timeout: float = 30.0
    max_connections: int = 4096
    max_connections_per_client: int = 64


@dataclass(frozen=True)
class JanitorConfig:
    """``[janitor]``: the hourly cleanup rota."""

    start_hour: int = 3
    max_days: float = 30.0
    failed_days: float = 14.0
    tmp_grace_hours: float = 24.0


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: where publishers and the janitor serve ``/metrics``.

    The publisher of the i-th repository hosted here (i = 0, 1, ...) listens on
    ``publisher_listen``'s port + i. A port of 0 disables that exporter.
    """

    publisher_listen: str = "127.0.0.1:9461"
    janitor_listen: str = "127.0.0.1:9460"
    replicator_listen: str = "127.0.0.1:9459"


@dataclass(frozen=True)
class Config:
    """The whole configuration of one host."""

    path: Path
    server: ServerConfig
    repositories: tuple[RepositoryConfig, ...]
    publisher: PublisherConfig = field(default_factory=PublisherConfig)
    ingest: IngestConfig | None = None
    janitor: JanitorConfig = field(default_factory=JanitorConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def repository(self, name: str) -> RepositoryConfig:
        """The repository called ``name``; KeyError if there is none."""
        for repo in self.repositories:
            if repo.name == name:
                return repo
        raise KeyError(name)

    @property
    def hosted(self) -> tuple[RepositoryConfig, ...]:
        """Repositories published by this server, in configuration order."""
        return tuple(r for r in self.repositories if r.is_hosted_on(self.server.name))

    @property
    def lock_dir(self) -> Path:
        """Where repository locks live (local disk, never cleaned by the janitor)."""
        return self.server.state / "locks"


def split_address(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too) into its parts; ValueError if malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (a server listens on all interfaces)


class _Section:
    """Typed reads from one TOML table, collecting problems instead of raising at once."""

    def __init__(self, table: Any, where: str, base: Path, problems: list[str]) -> None:
        self.where = where
        self.base = base
        self.problems = problems
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table")
            table = {}
        self.table: dict[str, Any] = table
        self.seen: set[str] = set()

    def _get(self, key: str, kind: type | tuple[type, ...], default: T, label: str) -> T:
        self.seen.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.problems.append(f"{self.where}.{key}: expected {label}, got a boolean")
            return default
        if not isinstance(value, kind):
            self.problems.append(f"{self.where}.{key}: expected {label}, got {value!r}")
            return default
        return value  # type: ignore[return-value]

    def string(
        self, key: str, default: str, check: Callable[[str], str | None] | None = None
    ) -> str:
        value = self._get(key, str, default, "a string")
        if check is not None and key in self.table:
            problem = check(value)
            if problem:
                self.problems.append(f"{self.where}.{key}: {problem}")
        return value

    def required(self, key: str) -> str:
        if key not in self.table:
            self.problems.append(f"{self.where}.{key}: missing (required)")
            self.seen.add(key)
            return ""
        return self.string(key, "")

    def integer(self, key: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        value = self._get(key, int, default, "an integer")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            self.problems.append(f"{self.where}.{key}: must be at least {minimum}{upper}")
            return default
        return value

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = float(self._get(key, (int, float), default, "a number"))
        if value < minimum:
            self.problems.append(f"{self.where}.{key}: must be at least {minimum}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return self._get(key, bool, default, "true or false")

    def path(self, key: str, default: Path | None) -> Path | None:
        if key not in self.table:
            self.seen.add(key)
            return default
        value = self.string(key, "")
        if not value:
            self.problems.append(f"{self.where}.{key}: must not be empty")
            return default
        return (self.base / Path(value).expanduser()).resolve() if value else default

    def address(self, key: str, default: str) -> str:
        return self.string(key, default, _address_problem)

    def strings(self, key: str) -> tuple[str, ...]:
        value: list[Any] = self._get(key, list, [], "a list of strings")
        if not all(isinstance(v, str) and v for v in value):
            self.problems.append(f"{self.where}.{key}: expected a list of non-empty strings")
            return ()
        return tuple(value)

    def paths_by_name(self, key: str) -> tuple[tuple[str, Path], ...]:
        """A table of name -> path (paths relative to the configuration file)."""
        value: dict[str, Any] = self._get(key, dict, {}, "a table of name = \"path\"")
        if not all(isinstance(v, str) and v for v in value.values()):
            self.problems.append(f"{self.where}.{key}: every value must be a non-empty path")
            return ()
        return tuple((name, (self.base / Path(v).expanduser()).resolve())
                     for name, v in value.items())

    def lists_by_name(self, key: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """A table of name -> non-empty list of non-empty strings."""
        value: dict[str, Any] = self._get(key, dict, {}, 'a table of name = ["...", ...]')
        if not all(isinstance(v, list) and v and all(isinstance(s, str) and s for s in v)
                   for v in value.values()):
            self.problems.append(f"{self.where}.{key}: every value must be a non-empty list of "
                                 "non-empty strings")
            return ()
        return tuple((name, tuple(v)) for name, v in value.items())

    def finish(self) -> None:
        for key in sorted(set(self.table) - self.seen):
            self.problems.append(f"{self.where}: unknown key {key!r}")


def _address_problem(value: str) -> str | None:
    try:
        split_address(value)
    except ValueError as err:
        return str(err)
    return None


def _url_problem(value: str) -> str | None:
    if not value.startswith(("http://", "https://")) or len(value.split("/")[2]) == 0:
        return f"{value!r} is not an http:// or https:// URL"
    return None


def _name_problem(value: str) -> str | None:
    if not value or "/" in value or value.startswith(".") or any(c.isspace() for c in value):
        return f"{value!r} is not a usable name (no '/', whitespace or leading '.')"
    return None


def _parse_server(sec: _Section) -> ServerConfig:
    name = sec.string("name", socket.gethostname().split(".")[0], _name_problem)
    spool = sec.path("spool", (sec.base / ServerConfig.spool).resolve())
    state = sec.path("state", (sec.base / ServerConfig.state).resolve())
    prefix = sec.string("prefix", "sw", _name_problem)
    stamps = sec.string("stamps", "ts", _name_problem)
    if prefix == stamps:
        sec.problems.append(f"{sec.where}: prefix and stamps must differ")
    interval = sec.number("replica_interval", ServerConfig.replica_interval, minimum=1.0)
    sec.finish()
    assert spool is not None and state is not None
    return ServerConfig(name=name, spool=spool, state=state, prefix=prefix, stamps=stamps,
                        replica_interval=interval)


def _parse_repository(sec: _Section) -> RepositoryConfig:
    name = sec.required("name")
    if name and (problem := _name_problem(name)):
        sec.problems.append(f"{sec.where}.name: {problem}")
    host = sec.required("host")
    backend = sec.string("backend", "local")
    if backend not in BACKENDS:
        sec.problems.append(f"{sec.where}.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    root = sec.path("root", None)
    mount = sec.string("mount", f"/cvmfs/{name}")
    replica = sec.path("replica", None)
    timeout = sec.number("command_timeout", 1800.0, minimum=1.0)
    cvmfs_ingest = sec.boolean("cvmfs_ingest", False)
    if cvmfs_ingest and backend != "cvmfs-server":
        sec.problems.append(f"{sec.where}.cvmfs_ingest: only for the cvmfs-server backend")
    keys = sec.path("keys", None)
    whitelist_days = sec.integer("whitelist_days", 30, minimum=1, maximum=3650)
    gc_keep_hours = sec.number("gc_keep_hours", 24.0)
    if not mount.startswith("/"):
        sec.problems.append(f"{sec.where}.mount: {mount!r} must be an absolute path")
    if backend in ("local", "cvmfs-native") and root is None:
        sec.problems.append(f"{sec.where}.root: required by the {backend} backend")
    origin = sec.string("origin", "", _url_problem) or None
    master_key = sec.path("master_key", None)
    for key in ("origin", "master_key"):
        if key in sec.table and replica is None:
            sec.problems.append(f"{sec.where}.{key}: only for a repository with a replica")
    sec.finish()
    return RepositoryConfig(name=name, host=host, backend=backend, root=root, mount=mount,
                            replica=replica, command_timeout=timeout,
                            cvmfs_ingest=cvmfs_ingest, keys=keys,
                            whitelist_days=whitelist_days, gc_keep_hours=gc_keep_hours,
                            origin=origin, master_key=master_key)


def _parse_publisher(sec: _Section) -> PublisherConfig:
    d = PublisherConfig()
    observer = sec.string("observer", d.observer)
    if observer not in ("inotify", "polling"):
        sec.problems.append(f"{sec.where}.observer: must be 'inotify' or 'polling'")
    cfg = PublisherConfig(
        batch_max_entries=sec.integer("batch_max_entries", d.batch_max_entries, minimum=1),
        batch_max_bytes=sec.integer("batch_max_bytes", d.batch_max_bytes, minimum=1),
        rescan_seconds=sec.number("rescan_seconds", d.rescan_seconds, minimum=0.1),
        max_members=sec.integer("max_members", d.max_members, minimum=1),
        max_unpacked_bytes=sec.integer("max_unpacked_bytes", d.max_unpacked_bytes, minimum=1),
        max_attempts=sec.integer("max_attempts", d.max_attempts, minimum=1),
        durable=sec.boolean("durable", d.durable),
        observer=observer,
    )
    sec.finish()
    return cfg


def _parse_ingest(sec: _Section) -> IngestConfig:
    d = IngestConfig()
    http_listen = sec.address("http_listen", "") or None
    cfg = IngestConfig(
        listen=sec.address("listen", d.listen),
        http_listen=http_listen,
        certificate=sec.path("certificate", d.certificate) or d.certificate,
        key=sec.path("key", d.key) or d.key,
        ca_dir=sec.path("ca_dir", d.ca_dir) or d.ca_dir,
        grid_mapfile=sec.path("grid_mapfile", d.grid_mapfile) or d.grid_mapfile,
        token_issuers=sec.strings("token_issuers"),
        token_audiences=sec.strings("token_audiences"),
        token_keys=sec.paths_by_name("token_keys"),
        max_upload_bytes=sec.integer("max_upload_bytes", d.max_upload_bytes, minimum=1),
        allow_limited_proxies=sec.boolean("allow_limited_proxies", d.allow_limited_proxies),
        crl_check=sec.boolean("crl_check", d.crl_check),
        context_reload_seconds=sec.number("context_reload_seconds", d.context_reload_seconds, 1.0),
        spool_reserve_bytes=sec.integer("spool_reserve_bytes", d.spool_reserve_bytes),
        threads=sec.integer("threads", d.threads, minimum=1, maximum=1024),
        socket_timeout=sec.number("socket_timeout", d.socket_timeout, minimum=1.0),
        localhost_trusted=sec.boolean("localhost_trusted", d.localhost_trusted),
        group_publishers=sec.lists_by_name("group_publishers"),
        stamp_on_exists=sec.boolean("stamp_on_exists", d.stamp_on_exists),
        stamp_on_exists_seconds=sec.number("stamp_on_exists_seconds",
                                           d.stamp_on_exists_seconds, minimum=1.0),
        check_uploads=sec.string("check_uploads", d.check_uploads),
        handshake_timeout=sec.number("handshake_timeout", d.handshake_timeout, minimum=1.0),
        header_timeout=sec.number("header_timeout", d.header_timeout, minimum=1.0),
        idle_timeout=sec.number("idle_timeout", d.idle_timeout, minimum=1.0),
        max_connections=sec.integer("max_connections", d.max_connections, minimum=16,
                                    maximum=1_000_000),
        max_connections_per_client=sec.integer("max_connections_per_client",
                                               d.max_connections_per_client),
    )
    if cfg.check_uploads not in CHECK_UPLOADS:
        sec.problems.append(f"{sec.where}.check_uploads: {cfg.check_uploads!r} is not one of "
                            + ", ".join(CHECK_UPLOADS))
    if cfg.max_connections < cfg.threads:
        sec.problems.append(f"{sec.where}.max_connections: must be at least threads "
                            f"({cfg.threads})")
    if cfg.max_connections_per_client > cfg.max_connections:
        sec.problems.append(f"{sec.where}.max_connections_per_client: must be at most "
                            f"max_connections ({cfg.max_connections})")
    for issuer in cfg.token_issuers:
        if not issuer.startswith("https://"):
            sec.problems.append(f"{sec.where}.token_issuers: {issuer!r} is not an https:// URL")
    for issuer, _ in cfg.token_keys:
        if issuer not in cfg.token_issuers:
            sec.problems.append(f"{sec.where}.token_keys: {issuer!r} is not in token_issuers")
    sec.finish()
    return cfg


def _parse_janitor(sec: _Section) -> JanitorConfig:
    d = JanitorConfig()
    cfg = JanitorConfig(
        start_hour=sec.integer("start_hour", d.start_hour, minimum=0, maximum=23),
        max_days=sec.number("max_days", d.max_days, minimum=0.001),
        failed_days=sec.number("failed_days", d.failed_days, minimum=0.001),
        tmp_grace_hours=sec.number("tmp_grace_hours", d.tmp_grace_hours, minimum=0.01),
    )
    sec.finish()
    return cfg


def _parse_metrics(sec: _Section) -> MetricsConfig:
    d = MetricsConfig()
    cfg = MetricsConfig(
        publisher_listen=sec.address("publisher_listen", d.publisher_listen),
        janitor_listen=sec.address("janitor_listen", d.janitor_listen),
        replicator_listen=sec.address("replicator_listen", d.replicator_listen),
    )
    sec.finish()
    return cfg


def parse_config(data: dict[str, Any], path: Path) -> Config:
    """Build a :class:`Config` from parsed TOML; raise ConfigError listing every problem."""
    problems: list[str] = []
    base = path.parent

    def section(key: str) -> _Section:
        return _Section(data.get(key, {}), key, base, problems)

    known = {"server", "repository", "publisher", "ingest", "janitor", "metrics"}
    problems.extend(f"unknown section [{k}]" for k in sorted(set(data) - known))
    server = _parse_server(section("server"))
    raw_repos = data.get("repository", [])
    if not isinstance(raw_repos, list) or not raw_repos:
        problems.append("at least one [[repository]] is required")
        raw_repos = []
    repos = tuple(
        _parse_repository(_Section(r, f"repository[{i + 1}]", base, problems))
        for i, r in enumerate(raw_repos)
    )
    names = [r.name for r in repos]
    problems.extend(f"repository {n!r} is configured twice" for n in sorted(set(names))
                    if names.count(n) > 1)
    roots = [r.root for r in repos if r.root is not None]
    if len(roots) != len(set(roots)):
        problems.append("two repositories share one root directory")
    config = Config(
        path=path,
        server=server,
        repositories=repos,
        publisher=_parse_publisher(section("publisher")),
        ingest=_parse_ingest(section("ingest")) if "ingest" in data else None,
        janitor=_parse_janitor(section("janitor")),
        metrics=_parse_metrics(section("metrics")),
    )
    if problems:
        raise ConfigError(problems)
    return config


def resolve_config_path(explicit: str | None, environ: dict[str, str] | None = None) -> Path:
    """``--config``, else ``$USERPUB_CONFIG``, else ``/etc/userpub/userpub.toml``."""
    env = os.environ if environ is None else environ
    chosen = explicit or env.get("USERPUB_CONFIG") or str(DEFAULT_CONFIG_PATH)
    return Path(chosen).expanduser().resolve()


def load_config(path: Path) -> Config:
    """Read and validate the configuration file at ``path``."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"configuration file {path} not found"]) from None
    except OSError as err:
        raise ConfigError([f"cannot read configuration file {path}: {err.strerror}"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{path}: invalid TOML: {err}"]) from None
    return parse_config(data, path)
