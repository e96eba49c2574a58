"""Errors a user can act on.

Anything raised as a `MyceliumError` is printed by the console command as one line
(`mycelium: error: <message>`) with a non-zero exit, never as a stack trace. The message
names the input and says what is wrong with it.
"""


class MyceliumError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(MyceliumError):
    """config.yaml, --config or --set holds something invalid."""


class DatasetError(MyceliumError):
    """A dataset path, name or row cannot be read."""


class ModelError(MyceliumError):
    """A model name, folder or file cannot be loaded."""


class StorageError(MyceliumError):
    """The storage root cannot be reached or written."""


class CorruptArtifactError(MyceliumError):
    """An artifact's parts do not match its manifest (missing part, wrong rows or checksum)."""
