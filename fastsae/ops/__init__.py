"""The functional ops of fastsae.

Each op dispatches to its Triton kernel (fastsae.kernels) for CUDA tensors and to its PyTorch
reference elsewhere; ``FASTSAE_BACKEND=triton|torch`` or ``backend=`` forces one.
"""

from fastsae.ops._backend import BACKENDS, requested_backend
from fastsae.ops.linear_kl import LinearKLStats, fused_linear_kl
from fastsae.ops.relu_autoencoder import ReLUAutoencodeOutput, relu_autoencode
from fastsae.ops.relu_encoder import relu_encode
from fastsae.ops.sparse_decoder import dense_decode, sparse_decode
from fastsae.ops.topk_encoder import topk_encode

__all__ = [
    "BACKENDS",
    "LinearKLStats",
    "ReLUAutoencodeOutput",
    "dense_decode",
    "fused_linear_kl",
    "relu_autoencode",
    "relu_encode",
    "requested_backend",
    "sparse_decode",
    "topk_encode",
]
