"""How every command reports bad input, at the bottom of the package so that every layer can use it
(data's commands included): exit code EXIT_CONFIG, and an argument parser whose errors are one line.
dist_llama.config.errors adds ConfigError on top."""

import argparse

EXIT_CONFIG = 2
"""Exit code of every command for bad configuration or input."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (a missing flag, `--workers abc`) are one line with exit code
    EXIT_CONFIG, like every other bad input: argparse prints its whole usage before the error."""

    def error(self, message: str):
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see --help)\n")
