"""Training code for facepipe's models (classifier, embedder); imported only when training."""
