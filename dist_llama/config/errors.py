"""How every command reports bad configuration or input: ConfigError, and exit code EXIT_CONFIG."""

from dist_llama.exit_codes import EXIT_CONFIG, ArgumentParser  # noqa: F401 (every command's, re-exported)
EXIT_FILE_ENV = "DIST_LLAMA_EXIT_FILE"
"""Where the trainer writes "CODE reason" when the run stops for good (2 or 3): torchrun's own status
(1, or killed) cannot tell a crash a launcher should retry from a stop it must not repeat."""


class ConfigError(ValueError):
    """A configuration or input problem, reported as `key: message` with exit code EXIT_CONFIG."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")
