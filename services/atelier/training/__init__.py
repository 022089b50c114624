"""TrainingService: DreamBooth fine-tuning on Ray Train.

servicer (gRPC adapter) -> engine (the ML work) -> config (settings).
"""

import os as _os

# Keep the service's own SIGTERM handling (drain, then exit 0): Ray's native failure
# signal handler, read when ray is first imported, would abort the process instead.
_os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
