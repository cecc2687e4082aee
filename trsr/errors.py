"""Errors a user can act on. The CLI prints their message (no traceback) and exits 2."""


class TrsrError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


class InputFileError(TrsrError):
    """A whole input file is unusable: missing, unreadable, wrong columns or format.

    The message always names the file and what is wrong with it.
    """


class ConfigError(TrsrError):
    """A configuration value is missing, unknown or inconsistent (names the key)."""


class DataError(TrsrError):
    """The inputs were read but leave nothing to work on (e.g. no interaction matches
    the catalogue); the message says what matched and what did not."""
