"""hatrt engines: TensorRT builder, FP8 quantization, runtimes, numeric checks and the CLI."""
