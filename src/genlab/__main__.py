"""`python -m genlab ...`, which is also what `accelerate launch -m genlab ...` runs."""

from genlab.cli import main

main()
