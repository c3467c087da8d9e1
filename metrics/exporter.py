"""Serving a registry on ``/metrics``, or writing it to a textfile for one-shot runs."""

from __future__ import annotations

import threading
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile

from userpub.config import split_address


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`close` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve_metrics(registry: CollectorRegistry, address: str) -> MetricsServer:
    """Serve ``registry`` at ``http://<address>/metrics`` from a daemon thread."""
    host, port = split_address(address)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)


def write_textfile(registry: CollectorRegistry, path: Path) -> None:
    """Write ``registry`` atomically in the node-exporter textfile format."""
    write_to_textfile(str(path), registry)
