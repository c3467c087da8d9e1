"""The development site: ``userpub init``'s example configuration and a development PKI.

For trying things out and for the tests; never imported by the service itself (only the CLI
and the tests may import it).
"""
