"""Encoders and what runs them: transformers and onnxruntime encoders, int8 quantisation, ONNX
export, devices, embedding files, and the Ray pool of encoder actors (`pool`, the one module here
that needs Ray: the rest imports with torch, transformers and pyarrow alone)."""
