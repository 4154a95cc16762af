"""`python -m bestcompress ...` (used by torchrun: `torchrun --nproc-per-node 2 -m bestcompress distill ...`)."""
from .cli import main

main()
