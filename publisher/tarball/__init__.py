"""Everything about the user's tarball: decompression, the tar stream, the member rules, unpacking.

The one home of every rule about tar members, used by every backend:

* :mod:`publisher.tarball.decompress`: detect the compression from the content, decompress on
  another core;
* :mod:`publisher.tarball.stream`: a lean streaming tar parser;
* :mod:`publisher.tarball.rules`: what a member may be and where it may go (names, symlink
  targets, hard links, type changes, limits);
* :mod:`publisher.tarball.unpack`: the rules applied to a directory on disk.
"""

from publisher.tarball.decompress import UnpackError, detect_compression
from publisher.tarball.rules import MemberRules, UnpackLimits, UnpackStats

__all__ = ["MemberRules", "UnpackError", "UnpackLimits", "UnpackStats", "detect_compression"]
