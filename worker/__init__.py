"""What runs on a GPU box: the embedder, the engine, prompt building and the batch pipeline."""
