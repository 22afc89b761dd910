"""The errors every part of a run raises for what it cannot do: each message is one line, printed as it is."""


class CheckpointError(Exception):
    """A checkpoint that cannot be found, read or written; the message is one line."""


class AlreadyReported(Exception):
    """An error that every process meets at once (a sharded save that failed), whose line the main process prints:
    the others exit with its code without repeating it."""


class UploadError(CheckpointError):
    """An upload or download that cannot be done; the message is one line."""


class ExportError(Exception):
    """A checkpoint that cannot be exported or loaded; the message is one line."""


class DataError(Exception):
    """Bad training data; the message is one line that names the file."""


class ShardUnavailableError(DataError):
    """A shard that could not be fetched (storage, network, local disk): it says nothing about the data,
    so it is never skipped as a bad shard, and it may strike one process and not the others."""
