"""The commands, one module each (``macft.cli`` lists them; a module is imported only when
its command is named). Each exposes ``HELP``, ``add_arguments(parser)`` and ``run(args)``;
the flags several commands share are in :mod:`._args`."""
