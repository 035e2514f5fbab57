"""Errors that end a job with a one-line message and a documented exit code."""


class NegprepError(Exception):
    """Base class: the message is shown as is, without a traceback."""

    exit_code = 1


class ConfigError(NegprepError):
    """The job file or the command line is wrong (exit code 2)."""

    exit_code = 2


class InputError(NegprepError):
    """An input file is missing, unreadable or breaks its contract (exit code 2)."""

    exit_code = 2
