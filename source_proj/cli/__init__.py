"""The ``source-proj`` command line (installed as ``source_proj.cli``): parses options, calls the library."""
