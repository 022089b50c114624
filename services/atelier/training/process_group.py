"""The workers' torch.distributed process group, on loopback for an embedded Ray.

Ray Train's own set-up starts rank 0's TCPStore (the rendezvous every rank
connects to) listening on all interfaces. On a cluster that is what the
deployment secures; an embedded Ray in the training service must expose
nothing beyond loopback. So for an embedded Ray the trainer gets a backend that
sets nothing up (:class:`LoopbackTorchConfig`), and each worker joins the
group itself (:func:`join_loopback_group`): rank 0 binds the store's socket to
127.0.0.1 and hands it to TCPStore, the collectives' own sockets are pinned to
the loopback interface, and the other ranks connect there.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from ray.train.backend import Backend
from ray.train.torch import TorchConfig

LOOPBACK = "127.0.0.1"
#: How long ranks wait for each other to join, seconds.
JOIN_TIMEOUT_S = 600


class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose backend leaves the process group to the training loop."""

    @property
    def backend_cls(self):
        return Backend


def free_loopback_port() -> int:
    """A free TCP port on loopback for rank 0's store (chosen by the driver, so every
    rank knows it before rank 0 has bound it)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def join_loopback_group(backend: str, port: int, rank: int, world_size: int) -> None:
    """Join the group of ``world_size`` ranks through a store on ``127.0.0.1:port``."""
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    listen_fd = None
    if rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, port))
        listener.listen(max(64, world_size * 2))
        listen_fd = listener.detach()  # the store owns (and closes) it from here
    timeout = timedelta(seconds=JOIN_TIMEOUT_S)
    store = dist.TCPStore(LOOPBACK, port, world_size, rank == 0, timeout=timeout,
                          master_listen_fd=listen_fd, use_libuv=True)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)
