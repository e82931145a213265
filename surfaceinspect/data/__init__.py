"""Reading images: decoding and resizing, folders and datasets, streaming batches, tiles, shards,
generated data and synthetic anomalies."""
