"""fxquant: FX graph-mode int8 quantization for PyTorch."""
