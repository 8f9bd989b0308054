import sys

from neurokern.accuracy.cli import main

sys.exit(main())
