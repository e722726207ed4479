"""Text in, batches out: reading sources, tokenising into windows, batching; BEIR folders; the quickstart's data."""
