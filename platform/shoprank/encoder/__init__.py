"""The text encoder: loading, fine-tuning on Ray Train, batch embedding and the index."""
