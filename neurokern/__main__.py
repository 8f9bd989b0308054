"""`python -m neurokern ...` (and `torchrun --nproc-per-node N -m neurokern merge ...`)."""
from neurokern.cli import entry

entry()
