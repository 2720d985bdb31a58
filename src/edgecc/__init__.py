"""edgecc: an ahead-of-time compiler that makes trained neural networks run on small devices."""

__version__ = "0.1.0"

from edgecc.api import CompiledModel, compile  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402

__all__ = ["CompiledModel", "EdgeccError", "compile", "__version__"]
