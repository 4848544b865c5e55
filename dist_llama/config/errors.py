"""How every command reports bad configuration or input: ConfigError, and exit code EXIT_CONFIG."""

EXIT_CONFIG = 2
"""Exit code of every command for bad configuration or input."""


class ConfigError(ValueError):
    """A configuration or input problem, reported as `key: message` with exit code EXIT_CONFIG."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")
