"""The ``atelier`` command line: train, generate, analyze and list models over gRPC."""
