import sys

from smolds.cli import main

sys.exit(main())
