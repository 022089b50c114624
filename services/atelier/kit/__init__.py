"""The service kit shared by atelier's three services.

One bootstrap path for every service: typed settings (``settings``), a grpc.aio
server with health, reflection, keepalive, message limits and graceful drain
(``server``), Prometheus metrics (``metrics``), bearer-token auth (``auth``),
TLS/mTLS (``tls``), error mapping to rich gRPC statuses (``errors``), and
structured JSON logs (``structured_logging``).
"""
