"""The torch-free runtime: numpy, pillow, a tokenizer and onnxruntime or openvino.

Nothing under this package may import torch, diffusers, transformers, optimum, onnx or leansd.export.
"""
