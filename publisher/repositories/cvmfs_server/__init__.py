"""The cvmfs-server backend: drives an installed ``cvmfs_server`` as the original service does.

* :mod:`.repository`: transactions (transaction / publish / abort -f), removal, gc;
* :mod:`.ingest_stream`: the checked tar stream of the optional ``cvmfs_server ingest`` mode;
* :mod:`.subprocess_log`: running its commands without blocking, logging what they print.
"""

from publisher.repositories.cvmfs_server.repository import (
    CvmfsServerRepository,
    default_published_view,
)

__all__ = ["CvmfsServerRepository", "default_published_view"]
