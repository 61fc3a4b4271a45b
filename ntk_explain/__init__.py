"""ntk-explain: explain trained PyTorch networks through their empirical neural tangent kernel."""

__version__ = "0.1.0"
