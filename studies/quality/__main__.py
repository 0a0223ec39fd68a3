"""``python -m studies.quality``: run the quality study (see :mod:`studies.quality.study`)."""

import sys

from studies.quality.study import main

sys.exit(main())
