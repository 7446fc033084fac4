"""``python -m benchmarks NAME`` from a source checkout (the same benchmarks as ``fedmq bench NAME``)."""

import sys

from benchmarks import main

sys.exit(main())
