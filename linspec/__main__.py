import sys

from linspec.cli import main

sys.exit(main())
