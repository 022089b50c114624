"""``atelier``: the command line for the atelier services (see SERVERS for the
connection rules and EXIT_CODES for what each exit status means)."""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from rich.markup import escape

from atelier.cli import analyze, generate, kube, models, train
from atelier.cli.output import err
from atelier.client.connection import ConnectionOptions
from atelier.client.errors import AtelierRpcError
from atelier.client.retry import RetryPolicy
from atelier.ports import GRPC_PORTS, local_target

#: Where each service listens when run locally (make up / make demo).
DEFAULT_SERVERS = {name: local_target(name) for name in GRPC_PORTS}

SERVERS = """connection flags come before the command (atelier --server HOST:PORT generate ...)
or from the environment. The server a command talks to is, first found: --server,
ATELIER_<SERVICE>_SERVER (SERVICE: TRAINING, GENERATION or ANALYSIS), ATELIER_SERVER,
then the local default: training 127.0.0.1:50051, generation :50052, analysis :50053."""

#: Every environment variable the CLI reads.
ENVIRONMENT = frozenset({
    "ATELIER_SERVER", "ATELIER_TRAINING_SERVER", "ATELIER_GENERATION_SERVER",
    "ATELIER_ANALYSIS_SERVER", "ATELIER_TOKEN", "ATELIER_TLS", "ATELIER_CA_FILE",
    "ATELIER_CERT_FILE", "ATELIER_KEY_FILE", "ATELIER_SERVER_NAME"})

EXIT_CODES = """exit codes:
  0  success
  1  the work ran but did not succeed (a job FAILED or was CANCELLED, an item failed)
  2  bad usage (flags, files), or the server rejected the request (INVALID_ARGUMENT,
     NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, OUT_OF_RANGE)
  3  the server could not be reached or was busy (UNAVAILABLE, DEADLINE_EXCEEDED,
     RESOURCE_EXHAUSTED after retries)
  4  authentication or permission failed (UNAUTHENTICATED, PERMISSION_DENIED)
  5  any other server error (INTERNAL, UNKNOWN, ...)
  130 interrupted (Ctrl-C)"""

_REJECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
             grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.OUT_OF_RANGE}
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED}
_AUTH = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def exit_code(error: AtelierRpcError) -> int:
    if error.code in _REJECTED:
        return 2
    if error.code in _UNREACHABLE:
        return 3
    if error.code in _AUTH:
        return 4
    return 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atelier", description="Train, generate, analyze: the atelier services "
                                    "from a terminal.",
        epilog=SERVERS + "\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    conn = parser.add_argument_group("connection")
    conn.add_argument("--server", metavar="HOST:PORT",
                      help="the service to talk to (see above for the defaults)")
    conn.add_argument("--token", dest="auth_token", metavar="TOKEN",
                      default=os.environ.get("ATELIER_TOKEN"),
                      help="bearer token sent with every call (env ATELIER_TOKEN)")
    conn.add_argument("--tls", action="store_true",
                      default=os.environ.get("ATELIER_TLS", "").lower() in ("1", "true", "yes"),
                      help="use TLS (env ATELIER_TLS=1); implied by --ca-file/--cert-file")
    conn.add_argument("--ca-file", default=os.environ.get("ATELIER_CA_FILE"),
                      help="PEM CA bundle that signs the server's certificate "
                           "(env ATELIER_CA_FILE; system roots otherwise)")
    conn.add_argument("--cert-file", default=os.environ.get("ATELIER_CERT_FILE"),
                      help="client certificate for mTLS (env ATELIER_CERT_FILE)")
    conn.add_argument("--key-file", default=os.environ.get("ATELIER_KEY_FILE"),
                      help="client private key for mTLS (env ATELIER_KEY_FILE)")
    conn.add_argument("--server-name", default=os.environ.get("ATELIER_SERVER_NAME"),
                      help="name to check the server's certificate against")
    conn.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                      help="deadline of each call, streams excepted (default 120)")
    conn.add_argument("--retries", type=int, default=5, metavar="N",
                      help="tries per call on UNAVAILABLE / RESOURCE_EXHAUSTED (default 5)")
    parser.add_argument("--json", action="store_true",
                        help="print machine-readable JSON (one document per line) instead "
                             "of text, and no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.register(commands)
    models.register(commands)
    generate.register(commands)
    analyze.register(commands)
    kube.register(commands)
    return parser


def connection(args: argparse.Namespace, service: str) -> ConnectionOptions:
    """The ConnectionOptions a command uses to reach ``service``."""
    target = (args.server or os.environ.get(f"ATELIER_{service.upper()}_SERVER")
              or os.environ.get("ATELIER_SERVER") or DEFAULT_SERVERS[service])
    return ConnectionOptions(
        target=target, token=args.auth_token, tls=args.tls, ca_file=args.ca_file,
        cert_file=args.cert_file, key_file=args.key_file, server_name=args.server_name,
        timeout_s=args.timeout, retry=RetryPolicy(max_attempts=max(1, args.retries)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args, lambda service: connection(args, service))
    except AtelierRpcError as error:
        err.print(f"[red]error:[/] {error.code.name}: {escape(error.message)}")
        for violation in error.field_violations:
            err.print(f"  {violation.field}: {violation.description}", markup=False)
        if error.request_id:
            err.print(f"  request id: {error.request_id}", markup=False)
        return exit_code(error)
    except (OSError, ValueError) as error:
        err.print(f"[red]error:[/] {escape(str(error))}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
