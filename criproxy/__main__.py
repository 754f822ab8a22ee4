"""`python -m criproxy` is the `criproxy` command."""

import sys

from criproxy.cli import main

sys.exit(main())
