//! ONNX Runtime: library discovery, environment, execution providers and session options.
