"""The exponential moving average of a run's trainable weights, by parameter name.

diffusers' ``EMAModel`` does the averaging (decay ``min(decay, (1 + n) / (10 + n))``
``n`` steps after ``start_step``, a copy of the weights before). Rank 0 keeps it
(every rank's weights are the same under DDP) and writes it into each full-state
checkpoint, so a resumed run continues the same average; the export writes it
instead of the raw weights unless the job asks for those.
"""

from __future__ import annotations

import torch

from atelier.training.train_config import EmaSettings


class Ema:
    def __init__(self, names: list[str], params: list[torch.nn.Parameter],
                 settings: EmaSettings) -> None:
        from diffusers.training_utils import EMAModel

        self.names = names
        self.average = EMAModel(params, decay=settings.decay,
                                update_after_step=settings.start_step)

    def step(self, params: list[torch.nn.Parameter]) -> None:
        self.average.step(params)

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: s.detach().cpu().contiguous()
                for n, s in zip(self.names, self.average.shadow_params, strict=True)}

    def state(self) -> dict:
        return {"optimization_step": int(self.average.optimization_step)}

    def load(self, weights: dict[str, torch.Tensor], state: dict) -> None:
        with torch.no_grad():
            for name, shadow in zip(self.names, self.average.shadow_params, strict=True):
                shadow.copy_(weights[name])
        self.average.optimization_step = state["optimization_step"]
