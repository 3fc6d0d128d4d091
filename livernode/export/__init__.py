"""ONNX export with an embedded manifest and a parity check against the Keras model."""
