"""The project's input-error type, at the bottom layer so that every module may raise it."""


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the key and what is allowed."""
