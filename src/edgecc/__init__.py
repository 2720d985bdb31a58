"""edgecc: an ahead-of-time compiler that makes trained neural networks run on small devices."""

__version__ = "0.1.0"
