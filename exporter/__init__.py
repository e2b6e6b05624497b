"""The model and its ONNX export: ModelConfig, the one-file Llama decoder, checkpoint loading, dialects."""
