"""Publishing: repository backends, the catalog (where is a CID), the safe streaming unpacker,
and the publisher daemon that moves spool entries into a repository."""
