"""Model loading, the tiny random models used by tests, sparsity masks and MAC counting."""
