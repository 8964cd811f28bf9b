"""`python -m amft_cli` is the `amft` command (used by `amft sweep` to start each run)."""

from amft_cli.cli import main

main()
