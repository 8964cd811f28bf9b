"""The `amft` executable. Ctrl-C while the program is still loading (typer, torch: seconds)
ends with one line and exit code 130, like a Ctrl-C later on; cli.main takes over from there."""

import os
import signal


def _while_loading(signum, frame):
    os.write(2, b"interrupted: stopped by Ctrl-C while starting up (nothing was written)\n")
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _while_loading)
    from amft_cli.children import stop_with_parent

    stop_with_parent()  # a sweep's cell: stop when the sweep dies
    from amft_cli.cli import main as cli_main

    cli_main()
