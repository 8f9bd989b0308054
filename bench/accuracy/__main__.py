import sys

from bench.accuracy.cli import main

sys.exit(main())
