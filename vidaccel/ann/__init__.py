"""ANN routing for attention (k-means/IVF on vidaccel.kernels, faiss, exact oracle)."""
