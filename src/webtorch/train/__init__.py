"""Online training: the write-ahead log of micro-batches, atomic checkpoints and the trainer."""
