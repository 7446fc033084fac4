"""Keep a working directory's stray modules from shadowing fedmq's siblings under ``python -m fedmq``.

``python -m`` puts the working directory first on ``sys.path``, and fedmq's siblings have generic names
(``broker``, ``schemas``, ``coordinator``, ``tasks``): a ``schemas.py`` lying where the command runs would be
imported instead of fedmq's own. ``fedmq/__main__.py`` drops that entry before it imports anything else, unless
fedmq was loaded from that very directory (a source checkout, whose siblings are the project's own). The
``fedmq`` console script never has the working directory on its path; this makes ``python -m fedmq`` the same.
"""

from __future__ import annotations

import os


def drop_working_directory(path: list[str], package_file: str, working_directory: str) -> list[str]:
    """``path`` without the working directory's entries ('' included), unless the package whose module is
    ``package_file`` lives in that directory."""
    here = os.path.realpath(working_directory)
    checkout = os.path.dirname(os.path.dirname(os.path.realpath(package_file)))
    if checkout == here:
        return list(path)
    return [entry for entry in path if os.path.realpath(os.path.join(here, entry)) != here]
