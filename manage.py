#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chittycan.settings")
    from django.core.management import execute_from_command_line

    from chittycan.cli import command_origin
    from core import origin

    with origin.using(command_origin(sys.argv[1:])):  # commands are audited as `cli`, with the OS user
        execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
