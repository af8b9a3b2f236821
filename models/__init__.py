"""Network definitions, ONNX export, and the torch-free runtime policy."""
