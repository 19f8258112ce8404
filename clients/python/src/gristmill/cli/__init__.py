"""The ``gristmill`` command line."""
