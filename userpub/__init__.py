"""cvmfs-userpub: publish grid users' code tarballs into CernVM-FS repositories.

This package is the front door: configuration, CID rules, the daemon skeleton and the CLI.
It imports only the standard library (``cli.py`` alone wires the stage packages together).
"""

__version__ = "0.1.0"
