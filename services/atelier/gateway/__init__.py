"""The OpenAI-compatible HTTP gateway: the OpenAI HTTP API over atelier's gRPC services.

No model code runs here. ``routes`` holds the HTTP endpoints, ``images`` and
``chat`` translate OpenAI bodies to GenerateRequest and AnalyzeRequest and back,
``errors`` maps gRPC status codes to OpenAI's error shape, ``config`` is the
gateway's settings and ``app`` builds the ASGI app and runs it
(``atelier-gateway``).
"""
