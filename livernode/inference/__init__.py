"""The model contract shared by export, evaluation and the daemon: the manifest and the ONNX Runtime runner."""
