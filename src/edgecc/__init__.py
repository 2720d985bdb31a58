"""edgecc: an ahead-of-time compiler that makes trained neural networks run on small devices."""

__version__ = "0.1.0"

from edgecc.api import CompiledModel, compile  # noqa: E402
from edgecc.errors import EdgeccError  # noqa: E402
from edgecc.partition import Partition, partition  # noqa: E402  (the function shadows the module name)

__all__ = ["CompiledModel", "EdgeccError", "Partition", "compile", "partition", "__version__"]
