"""The janitor: removes user code nobody used for ``max_days``, one repository per hour.

:mod:`janitor.rota` says which repository is due when (pure functions of time and
configuration), :mod:`janitor.cleanup` cleans one repository, :mod:`janitor.daemon` runs the
rota and the one-shot ``--now``/``--dry-run`` commands, :mod:`janitor.state` remembers the
last successful runs and :mod:`janitor.spoolclean` expires old spool leftovers.
"""
