"""AnalysisService: questions about images, documents, charts and video (Qwen3-VL).

servicer (gRPC adapter) -> engine (the ML work) -> config (settings).
"""
