"""``python -m fedmq`` is the ``fedmq`` command, with the working directory off the path (see fedmq.safe_path)."""

import os
import sys

from fedmq.safe_path import drop_working_directory

sys.path[:] = drop_working_directory(sys.path, __file__, os.getcwd())

from fedmq.cli import main  # noqa: E402  (only once the path is safe)

sys.exit(main())
