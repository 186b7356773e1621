"""Input data: the offline Fashion-MNIST builder, preprocessing and the grain pipeline."""
