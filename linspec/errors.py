"""The one exception type the CLI turns into a single line on stderr and a non-zero exit."""


class LinspecError(ValueError):
    """A user-facing problem (bad input, missing file, unsupported model) with a message fit for one line."""
