"""An independent reader and verifier of CernVM-FS stratum-0 repositories.

Written against the storage-format specification (``docs/cvmfs-format.md``), not against our
writer: it must never import ``publisher.repositories.cvmfs_native`` (and the writer must not import
it), so that it checks the writer rather than repeating its assumptions.

- :func:`cvmfs_verify.verify.verify_repository`: ``userpub verify`` (signatures,
  whitelist, every catalog, every object, counters, history, reflog).
- :class:`cvmfs_verify.client.Reader`: ``userpub ls`` / ``userpub cat`` (reads as a
  client does, over HTTP or from a directory).

Nothing is imported here, so that building the ``userpub`` parser stays cheap.
"""
