"""The one exception type for a bad config value (kept apart so every module can raise it)."""


class ConfigError(ValueError):
  """A bad config value; the message is one line and names the value."""
