"""The Ray cluster a job trains on, and one Ray Train run (``fit``) of a job.

An embedded Ray (no ``ray_address``) binds loopback only and starts no
dashboard; a cluster is the deployment's to secure (KubeRay with
NetworkPolicies): Ray has no authentication worth relying on, and anyone who can
reach its ports can run code as this service.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from atelier.training.config import TrainingEngineSettings
from atelier.training.worker_config import LoopbackGroup, WorkerConfig
from atelier.v1 import training_pb2

#: Whether ensure_ray() connected this process to Ray (so shutdown_ray() may disconnect it).
_ray_started_here = False

#: Makes Ray take the loopback address as this node's IP (its own switch, named for
#: the desktop platforms where it is the default), so that every daemon of an
#: embedded Ray (GCS, raylet, workers, agents) listens on loopback only.
_LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _cluster_address(settings: TrainingEngineSettings) -> str | None:
    return settings.ray_address or os.environ.get("RAY_ADDRESS") or None


def ensure_ray(settings: TrainingEngineSettings) -> None:
    """Connect to the configured Ray cluster, or start an embedded one on loopback."""
    global _ray_started_here
    address = _cluster_address(settings)
    if address is None:
        # Read when ray is imported (below, for the first time in this process),
        # and inherited by the daemons Ray starts.
        os.environ[_LOOPBACK_ONLY_ENV] = "0"
    import ray

    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
    if address is None:
        kwargs["num_cpus"] = settings.local_ray_cpus or os.cpu_count()
        kwargs["_node_ip_address"] = "127.0.0.1"
    ray.init(address=address, **kwargs)
    _ray_started_here = True


def shutdown_ray() -> None:
    """Disconnect from Ray if ensure_ray() connected; a local Ray stops with all its
    processes, so none outlives the service."""
    global _ray_started_here
    if _ray_started_here:
        import ray

        ray.shutdown()
        _ray_started_here = False


def fit(config: WorkerConfig, resources: training_pb2.TrainingResources,
        settings: TrainingEngineSettings) -> None:
    """Run the job's training loop on ``resources.num_workers`` Ray Train workers (gloo
    on CPU, NCCL on GPU); Ray restarts the group from the last checkpoint up to
    ``max_worker_failures`` times."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from atelier.training.loop import train_loop_per_worker

    use_gpu = resources.gpus_per_worker > 0
    backend = "nccl" if use_gpu else "gloo"
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    torch_config = TorchConfig(backend=backend)
    if _ray_started_here and _cluster_address(settings) is None:
        # Embedded Ray: the workers form their group on loopback (process_group.py).
        from atelier.training.process_group import LoopbackTorchConfig, free_loopback_port

        torch_config = LoopbackTorchConfig(backend=backend)
        config = config.with_group(LoopbackGroup(backend, free_loopback_port()))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"worker": config},  # Ray Train takes a dict
        torch_config=torch_config,
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            storage_path=str(Path(tempfile.gettempdir()) / "atelier-ray-runs"),
            name=f"{config.job_id}-{os.getpid()}",
            failure_config=FailureConfig(max_failures=settings.max_worker_failures)),
    )
    trainer.fit()
