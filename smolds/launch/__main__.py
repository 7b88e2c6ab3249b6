"""`python -m smolds.launch ARGS`: the torchrun launcher (launch.py); `--help` lists its flags."""

import sys

from smolds.launch.launch import main

sys.exit(main())
