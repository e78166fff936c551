"""Integer formats, quantized layers and the kernel registry."""
