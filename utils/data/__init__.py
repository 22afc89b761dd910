"""Training and validation data: the seeded order and exact position of the sample stream, the background loader,
reading and packing shards, the local cache of gs:// shards, and the held-out batches. utils/data_utils.py sets a
run's data up from these in one call."""
