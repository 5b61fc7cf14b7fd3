"""edgemm.export: the workstation side. Builds PyTorch models, exports and verifies ONNX bundles."""
