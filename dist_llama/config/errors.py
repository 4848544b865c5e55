"""How every command reports bad configuration or input: ConfigError, and exit code EXIT_CONFIG."""

import argparse

EXIT_CONFIG = 2
"""Exit code of every command for bad configuration or input."""
EXIT_FILE_ENV = "DIST_LLAMA_EXIT_FILE"
"""Where the trainer writes "CODE reason" when the run stops for good (2 or 3): torchrun's own status
(1, or killed) cannot tell a crash a launcher should retry from a stop it must not repeat."""


class ConfigError(ValueError):
    """A configuration or input problem, reported as `key: message` with exit code EXIT_CONFIG."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (a missing flag, `--workers abc`) are one line with exit code
    EXIT_CONFIG, like every other bad input: argparse prints its whole usage before the error."""

    def error(self, message: str):
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see --help)\n")
