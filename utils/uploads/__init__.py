"""Uploads of checkpoints to the destination (a local folder or gs://): the background workers, uploads.json, the
formats (the files layout and archives), the transfer of one checkpoint's files, the destination itself (checks,
listings, restores), and the copy of the logs beside the checkpoints."""
