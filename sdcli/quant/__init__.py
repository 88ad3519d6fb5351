"""Quantized weights: the ggml block types (ggml_types), their dequantizers in vectorized torch (dequantize), a
weight kept as raw blocks (tensor: QuantizedTensor), Linear/Conv2d layers that dequantize in their forward with
LoRA applied at run time (layers), and the per-tensor rules for writing quantized files (quantize).

Imports runtime only: formats/gguf.py reads files into these types, loading/ builds quantized networks from them.
"""
