"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class Sd2Error(Exception):
    """Bad input the user can fix (a config field, a file, a dataset row).

    The message must name the field or file; the CLI prints ``sd2 <cmd>: <message>``.
    """


class ConfigError(Sd2Error):
    """A config file or override that does not validate."""


class DataError(Sd2Error):
    """A dataset or model directory that cannot be used as given."""
