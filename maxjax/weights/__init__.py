"""Weight readers: safetensors (memory-mapped) and GGUF, and the names of quantization encodings."""
