"""Model serving: the Model API and loader, tensor codecs, the batch scheduler and executor, OIP."""
