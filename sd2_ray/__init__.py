"""sd2-ray: Self-Distilled Sparse Drafters on Ray."""

__version__ = "0.1.0"
