"""`python -m saelens_moe.browse`."""

from saelens_moe.browse.cli import main

main()
