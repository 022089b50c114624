"""GenerationService: text-to-image with Stable-Diffusion-style models.

servicer (gRPC adapter) -> engine (the ML work) -> config (settings).
"""
