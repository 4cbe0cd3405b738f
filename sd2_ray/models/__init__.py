"""Model loading, sparsity masks and MAC counting."""
