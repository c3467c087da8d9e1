"""The grid user's side of cvmfs-userpub: standard library only, Python >= 3.9.

Installed on submit hosts and worker nodes, alone (its own distribution, ``cvmfs-userpub-client``,
command ``userpub-client``) or with the server (``userpub client ...``):

* :mod:`userpub_client.api`: the HTTPS API (publish, exists, update, status, config, ping) over
  a list of servers;
* :mod:`userpub_client.cli`: the commands;
* :mod:`userpub_client.credentials`: X.509 proxies and bearer tokens where grid tools keep them;
* :mod:`userpub_client.reproducible_tar`: tarballs whose CID does not change with mtimes;
* :mod:`userpub_client.wait`: wait on a worker node until a CID is visible under /cvmfs;
* :mod:`userpub_client.cid`: the CID grammar (the one copy; the server imports it).
"""

__version__ = "0.2.0"
