"""What a run writes: the checkpoint and its metadata."""
