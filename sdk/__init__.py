"""edgemm: multimodal models at the edge."""
