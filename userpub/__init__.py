"""cvmfs-userpub: publish grid users' code tarballs into CernVM-FS repositories.

This package is the foundation (standard library only): configuration, the daemon skeleton,
errors, filesystem primitives and lock paths; plus the front door: the ``userpub`` command
(``cli.py``, the only module that wires the stages together) and the supervisor of
``userpub run``.
"""

__version__ = "0.2.0"
