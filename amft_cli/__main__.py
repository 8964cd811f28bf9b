"""`python -m amft_cli` is the `amft` command (used by `amft sweep` to start each run)."""

from amft_cli.entry import main

main()
