"""What flows through the pipeline: catalog rows in, embeddings and dead letters out."""
