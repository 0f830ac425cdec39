"""The ``emrfuse`` command line: one module per sub-command, loaded lazily by :mod:`.cli`."""
