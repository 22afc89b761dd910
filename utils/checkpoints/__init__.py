"""Checkpoints: their folders and names, writing them (synchronously or in the background), their checksums, reading
them safely, choosing the one to resume, which run owns them, and exporting one as a Hugging Face model. The
Checkpointer (utils/checkpoint_utils.py) puts these together for a run."""
