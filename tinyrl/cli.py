"""Command-line plumbing shared by train.py, eval.py and the `python -m tinyrl.*` tools.

Bad input must never end in a traceback: library code raises `UserError` with one clear
sentence, and `run_main` prints it as one line on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


def cache_dir() -> str:
    """Where tinyrl keeps what it downloads or measures once: $TINYRL_CACHE, else ~/.cache/tinyrl."""
    return os.environ.get("TINYRL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tinyrl"))


class UserError(Exception):
    """A problem with what the user asked for (a path, a flag, a file). Printed as one line, exit 2."""


class ArgParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line on stderr (not the usage block) and exit code 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def run_main(main: Callable[[], int | None], oom_hint: str = "--batch-size") -> None:
    """Run a CLI entry point, turning UserError and CUDA out-of-memory into one line and exit code 2."""
    import torch

    from tinyrl.dist import finish

    try:
        code = main()
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        code = 2
    except torch.OutOfMemoryError:
        sys.stderr.write(f"error: out of GPU memory; lower {oom_hint} (python -m tinyrl.memory suggests values)\n")
        code = 2
    finish(code or 0)  # sys.exit; under torchrun, also leaves the process group cleanly
