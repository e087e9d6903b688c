"""fastsae: end-to-end sparse autoencoders with fused Triton kernels."""

__version__ = "0.1.0"

from fastsae import ops  # noqa: E402
from fastsae.sae import E2ESAE, SAEOutput, SparseCode  # noqa: E402

__all__ = ["E2ESAE", "SAEOutput", "SparseCode", "ops", "__version__"]
