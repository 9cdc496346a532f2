"""Compiled engines: the ONNX export (`onnx_export`) for ONNX Runtime, TensorRT plans
(`tensorrt_build`), and where they live (`manifest`). CLI: `python -m llmserve.export`.

Kept import-light: the runners read `manifest` without pulling in the exporters.
"""
