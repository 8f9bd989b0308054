"""`python -m neurokern ...` (and `torchrun --nproc-per-node N -m neurokern merge ...`)."""
import sys

from neurokern.cli import main

sys.exit(main())
