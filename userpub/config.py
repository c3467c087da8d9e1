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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from userpub.pair import PairConfig, PeerConfig, parse_pair, url_problem
from userpub.toml_section import Section, name_problem, split_address

__all__ = ["BACKENDS", "Config", "ConfigError", "IngestConfig", "JanitorConfig", "MetricsConfig",
           "PublisherConfig", "RepositoryConfig", "ServerConfig", "load_config", "parse_config",
           "resolve_config_path", "split_address"]

DEFAULT_CONFIG_PATH = Path("/etc/userpub/userpub.toml")
BACKENDS = ("local", "cvmfs-server", "cvmfs-native")
GIB = 1024**3

class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: this host and its working directories."""

    name: str
    spool: Path = Path("/var/spool/userpub")  # as the systemd units of systemd/ expect
    state: Path = Path("/var/lib/userpub")
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
    create: bool = False  # the publisher may make a missing root (examples and tests only)
    origin: str | None = None  # replica: the origin's stratum-0 URL (default: its peer's)
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
    pair: PairConfig = field(default_factory=PairConfig)
    peers: tuple[PeerConfig, ...] = ()  # the other servers of the site

    def peer(self, name: str) -> PeerConfig:
        """The peer called ``name``; KeyError if there is none."""
        for peer in self.peers:
            if peer.name == name:
                return peer
        raise KeyError(name)

    def trusted_peer(self, dn: str) -> PeerConfig | None:
        """The peer whose host certificate has the subject ``dn``, if any."""
        return next((p for p in self.peers if p.dn and p.dn == dn), None)

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


def _parse_server(sec: Section) -> ServerConfig:
    name = sec.string("name", socket.gethostname().split(".")[0], name_problem)
    spool = sec.path("spool", (sec.base / ServerConfig.spool).resolve())
    state = sec.path("state", (sec.base / ServerConfig.state).resolve())
    prefix = sec.string("prefix", "sw", name_problem)
    stamps = sec.string("stamps", "ts", name_problem)
    if prefix == stamps:
        sec.problems.append(f"{sec.where}: prefix and stamps must differ")
    interval = sec.number("replica_interval", ServerConfig.replica_interval, minimum=1.0)
    sec.finish()
    assert spool is not None and state is not None
    return ServerConfig(name=name, spool=spool, state=state, prefix=prefix, stamps=stamps,
                        replica_interval=interval)


def _parse_repository(sec: Section) -> RepositoryConfig:
    name = sec.required("name")
    if name and (problem := name_problem(name)):
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
    create = sec.boolean("create", False)
    origin = sec.string("origin", "", url_problem) or None
    master_key = sec.path("master_key", None)
    for key in ("origin", "master_key"):
        if key in sec.table and replica is None:
            sec.problems.append(f"{sec.where}.{key}: only for a repository with a replica")
    if create and backend == "cvmfs-server":
        sec.problems.append(f"{sec.where}.create: not for the cvmfs-server backend "
                            "(cvmfs_server mkfs makes the repository)")
    if not mount.startswith("/"):
        sec.problems.append(f"{sec.where}.mount: {mount!r} must be an absolute path")
    if backend == "local" and root is None:
        sec.problems.append(f"{sec.where}.root: required by the local backend")
    sec.finish()
    return RepositoryConfig(name=name, host=host, backend=backend, root=root, mount=mount,
                            replica=replica, command_timeout=timeout,
                            cvmfs_ingest=cvmfs_ingest, keys=keys,
                            whitelist_days=whitelist_days, gc_keep_hours=gc_keep_hours,
                            create=create, origin=origin, master_key=master_key)



def _parse_publisher(sec: Section) -> PublisherConfig:
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


def _parse_ingest(sec: Section) -> IngestConfig:
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


def _parse_janitor(sec: Section) -> JanitorConfig:
    d = JanitorConfig()
    cfg = JanitorConfig(
        start_hour=sec.integer("start_hour", d.start_hour, minimum=0, maximum=23),
        max_days=sec.number("max_days", d.max_days, minimum=0.001),
        failed_days=sec.number("failed_days", d.failed_days, minimum=0.001),
        tmp_grace_hours=sec.number("tmp_grace_hours", d.tmp_grace_hours, minimum=0.01),
    )
    sec.finish()
    return cfg


def _parse_metrics(sec: Section) -> MetricsConfig:
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

    def section(key: str) -> Section:
        return Section(data.get(key, {}), key, base, problems)

    known = {"server", "repository", "publisher", "ingest", "janitor", "metrics", "pair", "peer"}
    problems.extend(f"unknown section [{k}]" for k in sorted(set(data) - known))
    server = _parse_server(section("server"))
    raw_repos = data.get("repository", [])
    if not isinstance(raw_repos, list) or not raw_repos:
        problems.append("at least one [[repository]] is required")
        raw_repos = []
    repos = tuple(
        _parse_repository(Section(r, f"repository[{i + 1}]", base, problems))
        for i, r in enumerate(raw_repos)
    )
    names = [r.name for r in repos]
    problems.extend(f"repository {n!r} is configured twice" for n in sorted(set(names))
                    if names.count(n) > 1)
    roots = [r.root for r in repos if r.root is not None]
    if len(roots) != len(set(roots)):
        problems.append("two repositories share one root directory")
    problems.extend(f"repository {r.name}: root is required by the cvmfs-native backend where "
                    "it is published (elsewhere, a root or a replica)" for r in repos
                    if r.backend == "cvmfs-native" and r.root is None
                    and (r.is_hosted_on(server.name) or r.replica is None))
    pair, peers = parse_pair(section("pair"), data.get("peer", []), base, problems, server.name)
    _check_pair(peers, server.name, repos, problems)
    config = Config(
        path=path,
        server=server,
        repositories=repos,
        publisher=_parse_publisher(section("publisher")),
        ingest=_parse_ingest(section("ingest")) if "ingest" in data else None,
        janitor=_parse_janitor(section("janitor")),
        metrics=_parse_metrics(section("metrics")),
        pair=pair,
        peers=peers,
    )
    if problems:
        raise ConfigError(problems)
    return config


def _check_pair(peers: tuple[PeerConfig, ...], server: str, repos: tuple[RepositoryConfig, ...],
                problems: list[str]) -> None:
    """Problems of a pair's repositories: hosts that are no server, backends that cannot pair."""
    if not peers:
        return
    servers = {server} | {p.name for p in peers}
    for repo in repos:
        if repo.host not in servers:
            problems.append(f"repository {repo.name}: host {repo.host!r} is neither this server "
                            f"nor a [[peer]] ({', '.join(sorted(servers))})")
        if repo.backend == "local":
            problems.append(f"repository {repo.name}: a pair needs cvmfs-native (or cvmfs-server) "
                            "repositories; a local tree has no signed, revisioned state a replica "
                            "can pull consistently")
        if not repo.is_hosted_on(server) and repo.host in servers and repo.replica is None:
            problems.append(f"repository {repo.name}: hosted on {repo.host}, it needs a replica "
                            "here (replica = \"<directory>\")")


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
