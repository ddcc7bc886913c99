"""The one exception type for mistakes the user can fix."""


class GenlabError(Exception):
    """An error the user can fix: the message says what happened and what to do.

    The CLI prints it in one or two lines, without a traceback, and exits non-zero
    (2 for a bad config, 1 otherwise).
    """

    exit_code = 1


class ConfigError(GenlabError):
    """A config that cannot work (unknown key or group, invalid value); exit code 2."""

    exit_code = 2
