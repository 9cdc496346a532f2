"""Compiled models: the ONNX export (`onnx_export`) for ONNX Runtime, TensorRT plans
(`tensorrt_build`), where they live and what they were built from (`manifest`), the decoder
graph (`graph`) and its tensors' names (`graph_io`). CLI: `python -m llmserve.export`.

Kept import-light: the runners read `manifest` without pulling in the exporters.
"""
