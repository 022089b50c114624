"""TrainingService: DreamBooth fine-tuning on Ray Train.

servicer (gRPC adapter) -> engine (the ML work) -> config (settings).
"""
