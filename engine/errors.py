"""The engine's two ways of stopping, mapped to exit codes by the CLI (kept import-light)."""


class ConfigError(ValueError):
    """A usage or configuration error: the CLI prints it on one line and exits 2."""


class WorkerStartError(ConfigError):
    """Workers fail while loading their models, again and again: a configuration error (exit 2)."""


class JobAborted(RuntimeError):
    """The run must stop (its job lease was lost, no worker could start): exit 1."""
