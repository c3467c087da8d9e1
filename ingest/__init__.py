"""The HTTPS publication API: grid users upload tarballs here, as with cvmfs-user-pub.

``run_ingest`` (:mod:`ingest.server`) is what ``userpub ingest`` runs; ``make_app``
(:mod:`ingest.app`) is the Bottle application; :mod:`ingest.auth` decides who is calling;
:mod:`devsite.pki` makes development certificates and tokens.
"""

__all__: list[str] = []
