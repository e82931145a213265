"""Running a trained model elsewhere: the ONNX export, graph runtimes, the HTTP service."""
