"""``python -m source_proj.cli`` (what torchrun runs: ``torchrun ... -m source_proj.cli featurize ...``)."""

import sys

from source_proj.cli.main import main

sys.exit(main())
