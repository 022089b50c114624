"""One scheduler update per scheduler kind and step, over all of that kind's rows.

A diffusers scheduler steps one sequence at a time: calling each sequence's
``scale_model_input`` and ``step`` costs a dozen small tensor operations per
row, so the host work of a step grows with the batch (on a GPU, kernel launches
that the device waits for). Here each kind of scheduler does the same arithmetic
for every row at once:

- each row's coefficients for this step (its sigma or alpha-bar, the next one's, its
  multistep weights) are plain floats computed from the row's own timetable,
  gathered into one small tensor per step;
- latents, predictions and multistep history are stacked once, combined with
  those coefficients, and split back into the rows once.

The number of tensor operations per step is then the same for 1 row or 64
(``tests/generation/test_scheduler_updates.py`` counts them). The formulas are
diffusers' own, row by row; the fidelity tests hold every served scheduler to
the pipelines. The arithmetic runs in float32 and the result takes the
latents' dtype, as Euler's step does in diffusers.

Covered, with the configurations atelier serves: DDIM (eta 0), PNDM (PLMS, with
``skip_prk_steps``, as Stable Diffusion's own config has it), Euler, Euler
ancestral, DPM-Solver++ (2M, midpoint), UniPC (bh1/bh2, predicting x0, order
up to 2) and flow-matching Euler (FLUX.2 [klein]; without stochastic
sampling). A scheduler of another class, or a configuration these do not cover
(PNDM's Runge-Kutta warm-up when a model's config lacks ``skip_prk_steps``,
thresholding, SDE variants, third order), steps through its own diffusers
``step``, one row at a time (the runner's ``_own_step``). Euler ancestral draws
each row's noise from the row's own generator, so it adds one draw per row: the
only per-row operation left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Rows
from dataclasses import dataclass, field

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor


@dataclass(eq=False)
class RowState:
    """What a kind keeps of one row: its timetable as floats and its history."""

    timesteps: list[float]  # the scheduler's whole timetable
    start: int  # index of the row's first step in it (image to image starts later)
    steps: int  # the scheduler's num_inference_steps
    sigmas: list[float] = field(default_factory=list)
    history: dict[str, torch.Tensor] = field(default_factory=dict)
    taken: int = 0  # updates done
    order: int = 0  # UniPC: the order of the last predictor


def _column(values: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-row coefficients as an (R, K) float32 tensor on ``like``'s device."""
    return torch.tensor(values, dtype=torch.float32, device=like.device)


def _col(coefficients: torch.Tensor, j: int) -> torch.Tensor:
    return coefficients[:, j].view(-1, 1, 1, 1)


def _kept(rows: Rows[RowState], name: str, zero: torch.Tensor) -> torch.Tensor:
    """The rows' kept tensor ``name`` in one batch, ``zero`` for a row that has none yet
    (its coefficient is then 0)."""
    return torch.cat([r.history.get(name, zero) for r in rows])


def _keep(rows: Rows[RowState], **tensors: torch.Tensor) -> None:
    """Each row keeps its slice of each batched tensor (one split per tensor)."""
    parts = {name: t.split(1) for name, t in tensors.items()}
    for i, row in enumerate(rows):
        for name, split in parts.items():
            row.history[name] = split[i]


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    """sigma of the variance-exploding form as (alpha_t, sigma_t) of the variance-preserving one."""
    alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def _lambda(sigma: float) -> float:
    """log(alpha_t) - log(sigma_t): the half log-SNR; +inf at sigma = 0."""
    alpha, sigma_t = _alpha_sigma(sigma)
    return math.inf if sigma_t == 0.0 else math.log(alpha) - math.log(sigma_t)


class UpdateKind:
    """A scheduler kind's batched update. One instance serves every row of one
    scheduler class and configuration."""

    divides_input = False  # scale_model_input divides by sqrt(sigma^2 + 1)

    def __init__(self, prototype) -> None:
        self.config = prototype.config
        self.prediction = getattr(prototype.config, "prediction_type", "flow")

    @classmethod
    def accepts(cls, scheduler) -> bool:
        raise NotImplementedError

    def begin(self, scheduler, first_timestep_index: int) -> RowState:
        """A row's state, for a scheduler whose ``set_timesteps`` ran; its first step is
        ``first_timestep_index`` of the timetable."""
        sigmas = getattr(scheduler, "sigmas", None)
        return RowState([float(t) for t in scheduler.timesteps.tolist()], first_timestep_index,
                        scheduler.num_inference_steps,
                        sigmas.tolist() if torch.is_tensor(sigmas) else [])

    def index(self, row: RowState) -> int:
        return row.start + row.taken

    def input_divisor(self, row: RowState) -> float:
        """What the row's UNet input is divided by at this step (1: unscaled)."""
        if not self.divides_input:
            return 1.0
        sigma = row.sigmas[self.index(row)]
        return math.sqrt(sigma**2 + 1.0)

    def update(self, rows: Rows[RowState], x: torch.Tensor, out: torch.Tensor,
               generators: list, dtype: torch.dtype) -> torch.Tensor:
        """The rows' next latents (float32) from latents ``x`` and model output ``out``
        (both float32, (R, C, H, W)); advances each row. ``generators``: the rows'
        own, for kinds that draw noise in the model's ``dtype``."""
        raise NotImplementedError

    def noise_coefficients(self, row: RowState) -> tuple[float, float]:
        """(a, b) of ``add_noise`` at the row's next timestep, ``a·x0 + b·noise``, as
        the scheduler computes it after the update (inpainting's blend); call it after
        ``update``."""
        raise NotImplementedError


# -- DDPM family (alpha-bar by timestep) ----------------------------------------------
class _AlphaKind(UpdateKind):
    def __init__(self, prototype) -> None:
        super().__init__(prototype)
        self.alphas = prototype.alphas_cumprod.tolist()
        self.final_alpha = float(prototype.final_alpha_cumprod)
        self.train_steps = prototype.config.num_train_timesteps

    def _alpha(self, t: float) -> float:
        return self.alphas[int(t)] if t >= 0 else self.final_alpha

    def noise_coefficients(self, row: RowState) -> tuple[float, float]:
        alpha = self.alphas[int(row.timesteps[self.index(row)])]
        return math.sqrt(alpha), math.sqrt(1.0 - alpha)


class DDIMKind(_AlphaKind):
    """DDIM with eta 0 (as the pipelines call it), epsilon, v or sample prediction."""

    @classmethod
    def accepts(cls, scheduler) -> bool:
        c = scheduler.config
        return type(scheduler) is DDIMScheduler and not c.thresholding and \
            c.prediction_type in ("epsilon", "v_prediction", "sample")

    def update(self, rows, x, out, generators, dtype):
        coefficients = []
        for row in rows:
            t = row.timesteps[self.index(row)]
            prev = t - self.train_steps // row.steps
            a_t, a_prev = self._alpha(t), self._alpha(prev)
            coefficients.append([math.sqrt(a_t), math.sqrt(1.0 - a_t), math.sqrt(a_prev),
                                 math.sqrt(1.0 - a_prev)])
            row.taken += 1
        c = _column(coefficients, x)
        sa, sb, sa_prev, sb_prev = (_col(c, j) for j in range(4))
        if self.prediction == "epsilon":
            x0, eps = (x - sb * out) / sa, out
        elif self.prediction == "sample":
            x0, eps = out, (x - sa * out) / sb
        else:
            x0, eps = sa * x - sb * out, sa * out + sb * x
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = x0.clamp(-r, r)
        return sa_prev * x0 + sb_prev * eps


class PNDMKind(_AlphaKind):
    """PNDM's linear multistep (PLMS) steps, with ``skip_prk_steps``: the first two
    steps average into a second-order start, then up to fourth-order Adams-Bashforth
    over the row's own last outputs."""

    #: Weights of (this output, the last three kept) by the number kept after this one.
    _WEIGHTS = {1: (1.0, 0.0, 0.0, 0.0), 2: (1.5, -0.5, 0.0, 0.0),
                3: (23 / 12, -16 / 12, 5 / 12, 0.0), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}

    @classmethod
    def accepts(cls, scheduler) -> bool:
        c = scheduler.config
        return type(scheduler) is PNDMScheduler and c.skip_prk_steps and \
            c.prediction_type in ("epsilon", "v_prediction")

    def update(self, rows, x, out, generators, dtype):
        weights, coefficients = [], []
        for row in rows:
            counter = row.taken  # PNDM counts a row's steps from its first, wherever it starts
            t = row.timesteps[self.index(row)]
            prev = t - self.train_steps // row.steps
            if counter == 1:
                t, prev = t + self.train_steps // row.steps, t
                w, from_first, keep = (0.5, 0.5, 0.0, 0.0), 1.0, 0.0
            else:
                kept = 1 if counter == 0 else min(counter, 4)
                w, from_first, keep = self._WEIGHTS[kept], 0.0, 1.0
            a_t, a_prev = self._alpha(t), self._alpha(prev)
            weights.append(list(w))
            coefficients.append([from_first, keep, float(counter == 0), math.sqrt(a_t),
                                 math.sqrt(1.0 - a_t), math.sqrt(a_prev / a_t),
                                 a_t * math.sqrt(1.0 - a_prev)
                                 + math.sqrt(a_t * (1.0 - a_t) * a_prev), a_prev - a_t])
            row.taken += 1
        history = _kept(rows, "outputs", out.new_zeros((1, 3, *out.shape[1:])))
        first = _kept(rows, "first", out.new_zeros((1, *out.shape[1:])))
        w = _column(weights, x)
        c = _column(coefficients, x)
        combined = _col(w, 0) * out + (w[:, 1:].view(-1, 3, 1, 1, 1) * history).sum(1)
        from_first, keep, is_first = _col(c, 0), _col(c, 1), _col(c, 2)
        sample = from_first * first + (1 - from_first) * x
        if self.prediction == "v_prediction":
            combined = _col(c, 3) * combined + _col(c, 4) * sample
        prev = _col(c, 5) * sample - _col(c, 7) * combined / _col(c, 6)
        shifted = torch.cat([out.unsqueeze(1), history[:, :2]], dim=1)
        keep5 = keep.view(-1, 1, 1, 1, 1)
        new_history = keep5 * shifted + (1 - keep5) * history
        new_first = is_first * x + (1 - is_first) * first
        _keep(rows, outputs=new_history, first=new_first)
        return prev


# -- sigma-based (Euler and the DPM family) --------------------------------------------
class _SigmaKind(UpdateKind):
    def begin(self, scheduler, first_timestep_index: int) -> RowState:
        row = super().begin(scheduler, first_timestep_index)
        if first_timestep_index == 0 and getattr(scheduler, "begin_index", None) is None:
            # As the scheduler finds its first step from the first timestep.
            row.start = int(scheduler.index_for_timestep(scheduler.timesteps[0]))
        return row


class EulerKind(_SigmaKind):
    """Euler (and, with ``ancestral``, Euler ancestral), epsilon or v prediction,
    without churn."""

    divides_input = True
    ancestral = False

    @classmethod
    def accepts(cls, scheduler) -> bool:
        return type(scheduler) is EulerDiscreteScheduler and \
            scheduler.config.prediction_type in ("epsilon", "v_prediction")

    def update(self, rows, x, out, generators, dtype):
        coefficients = []
        for row in rows:
            k = self.index(row)
            sigma, nxt = row.sigmas[k], row.sigmas[k + 1]
            up = math.sqrt(nxt**2 * (sigma**2 - nxt**2) / sigma**2) if self.ancestral else 0.0
            target = math.sqrt(nxt**2 - up**2) if self.ancestral else nxt
            coefficients.append([sigma, -sigma / math.sqrt(sigma**2 + 1), sigma**2 + 1,
                                 target - sigma, up])
            row.taken += 1
        c = _column(coefficients, x)
        sigma = _col(c, 0)
        if self.prediction == "epsilon":
            x0 = x - sigma * out
        else:
            x0 = out * _col(c, 1) + x / _col(c, 2)
        prev = x + (x - x0) / sigma * _col(c, 3)
        if self.ancestral:
            shape = (1, *out.shape[1:])
            noise = torch.cat([randn_tensor(shape, generator=g, device=out.device,
                                            dtype=dtype) for g in generators]).float()
            prev = prev + noise * _col(c, 4)
        return prev

    def noise_coefficients(self, row: RowState) -> tuple[float, float]:
        return 1.0, row.sigmas[self.index(row)]


class EulerAncestralKind(EulerKind):
    ancestral = True

    @classmethod
    def accepts(cls, scheduler) -> bool:
        return type(scheduler) is EulerAncestralDiscreteScheduler and \
            scheduler.config.prediction_type in ("epsilon", "v_prediction")


class _MultistepKind(_SigmaKind):
    """Shared by DPM-Solver++ and UniPC: x0 predictions, kept per row (history
    starts empty: its coefficients are 0 until a row has one)."""

    def _x0(self, x: torch.Tensor, out: torch.Tensor, sigma: torch.Tensor,
            alpha: torch.Tensor) -> torch.Tensor:
        """The x0 prediction in the variance-preserving form (alpha_t, sigma_t)."""
        if self.prediction == "epsilon":
            return (x - sigma * out) / alpha
        return alpha * x - sigma * out

    def noise_coefficients(self, row: RowState) -> tuple[float, float]:
        return _alpha_sigma(row.sigmas[self.index(row)])


class DPMSolverKind(_MultistepKind):
    """DPM-Solver++ (multistep, first or second order, midpoint), as ``dpmpp_2m``."""

    @classmethod
    def accepts(cls, scheduler) -> bool:
        c = scheduler.config
        return type(scheduler) is DPMSolverMultistepScheduler and \
            c.algorithm_type == "dpmsolver++" and c.solver_order in (1, 2) and \
            c.solver_type == "midpoint" and not c.thresholding and \
            c.prediction_type in ("epsilon", "v_prediction") and c.variance_type is None

    def update(self, rows, x, out, generators, dtype):
        c = self.config
        coefficients = []
        for row in rows:
            k = self.index(row)
            n = len(row.timesteps)
            last = k == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15)
                                   or c.final_sigmas_type == "zero")
            alpha_s, sigma_s = _alpha_sigma(row.sigmas[k])
            alpha_t, sigma_t = _alpha_sigma(row.sigmas[k + 1])
            h = _lambda(row.sigmas[k + 1]) - _lambda(row.sigmas[k])
            step = alpha_t * math.expm1(-h)  # alpha_t (e^{-h} - 1)
            a = sigma_t / sigma_s
            if c.solver_order == 1 or row.taken < 1 or last:
                b, m1 = -step, 0.0
            else:
                r0 = (_lambda(row.sigmas[k]) - _lambda(row.sigmas[k - 1])) / h
                b, m1 = -step * (1.0 + 0.5 / r0), 0.5 * step / r0
            coefficients.append([sigma_s, alpha_s, a, b, m1])
            row.taken += 1
        k = _column(coefficients, x)
        x0 = self._x0(x, out, _col(k, 0), _col(k, 1))
        previous = _kept(rows, "x0", x0.new_zeros((1, *x0.shape[1:])))
        prev = _col(k, 2) * x + _col(k, 3) * x0 + _col(k, 4) * previous
        _keep(rows, x0=x0)
        return prev


class UniPCKind(_MultistepKind):
    """UniPC (predictor UniP and corrector UniC, bh1 or bh2), predicting x0, order 1 or 2."""

    @classmethod
    def accepts(cls, scheduler) -> bool:
        c = scheduler.config
        return type(scheduler) is UniPCMultistepScheduler and c.predict_x0 and \
            c.solver_order in (1, 2) and c.solver_type in ("bh1", "bh2") and \
            not c.thresholding and c.solver_p is None and \
            c.prediction_type in ("epsilon", "v_prediction")

    def _b_h(self, hh: float) -> float:
        return hh if self.config.solver_type == "bh1" else math.expm1(hh)

    def _corrector(self, row: RowState, k: int) -> list[float]:
        """Coefficients of (last sample, x0 one step back, x0 two back, this x0)."""
        s = row.sigmas
        alpha_t, sigma_t = _alpha_sigma(s[k])
        _, sigma_s0 = _alpha_sigma(s[k - 1])
        h = _lambda(s[k]) - _lambda(s[k - 1])
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = self._b_h(hh)
        base = alpha_t * b_h
        if row.order == 1:
            rho_last, back2 = 0.5, 0.0
        else:
            rk = (_lambda(s[k - 2]) - _lambda(s[k - 1])) / h
            h_phi_k = h_phi_1 / hh - 1.0
            b1 = h_phi_k / b_h
            h_phi_k = h_phi_k / hh - 0.5
            b2 = h_phi_k * 2.0 / b_h
            rho0 = (b1 - b2) / (1.0 - rk)  # the 2x2 system [[1, 1], [rk, 1]] rho = b
            rho_last = b1 - rho0
            back2 = base * rho0 / rk
        return [sigma_t / sigma_s0, -alpha_t * h_phi_1 + base * rho_last + back2, -back2,
                -base * rho_last]

    def _predictor(self, row: RowState, k: int, order: int) -> list[float]:
        """Coefficients of (the corrected sample, this x0, x0 one step back)."""
        s = row.sigmas
        alpha_t, sigma_t = _alpha_sigma(s[k + 1])
        _, sigma_s0 = _alpha_sigma(s[k])
        h = _lambda(s[k + 1]) - _lambda(s[k])
        hh = -h
        h_phi_1 = math.expm1(hh)
        this, back = -alpha_t * h_phi_1, 0.0
        if order == 2:
            rk = (_lambda(s[k - 1]) - _lambda(s[k])) / h
            back = -alpha_t * self._b_h(hh) * 0.5 / rk
            this -= back
        return [sigma_t / sigma_s0, this, back]

    def update(self, rows, x, out, generators, dtype):
        c = self.config
        coefficients = []
        for row in rows:
            k = self.index(row)
            corrects = row.taken > 0 and (k - 1) not in c.disable_corrector
            corrector = self._corrector(row, k) if corrects else [0.0, 0.0, 0.0, 0.0]
            order = min(c.solver_order, len(row.timesteps) - k) if c.lower_order_final \
                else c.solver_order
            order = min(order, min(row.taken, c.solver_order) + 1)
            alpha_s, sigma_s = _alpha_sigma(row.sigmas[k])
            coefficients.append([sigma_s, alpha_s, 0.0 if corrects else 1.0, *corrector,
                                 *self._predictor(row, k, order)])
            row.order = order
            row.taken += 1
        k = _column(coefficients, x)
        x0 = self._x0(x, out, _col(k, 0), _col(k, 1))
        zero = x0.new_zeros((1, *x0.shape[1:]))
        last, back1, back2 = (_kept(rows, name, zero) for name in ("sample", "x0", "x0_back"))
        sample = (_col(k, 2) * x + _col(k, 3) * last + _col(k, 4) * back1
                  + _col(k, 5) * back2 + _col(k, 6) * x0)
        prev = _col(k, 7) * sample + _col(k, 8) * x0 + _col(k, 9) * back1
        _keep(rows, sample=sample, x0=x0, x0_back=back1)
        return prev


class FlowEulerKind(UpdateKind):
    """Flow-matching Euler: ``x + (sigma_next - sigma) * v``, the step's sigmas taken
    from the row's float32 timetable and subtracted in float32, as diffusers does."""

    @classmethod
    def accepts(cls, scheduler) -> bool:
        return type(scheduler) is FlowMatchEulerDiscreteScheduler and \
            not scheduler.config.stochastic_sampling

    def update(self, rows, x, out, generators, dtype):
        pairs = []
        for row in rows:
            k = self.index(row)
            pairs.append([row.sigmas[k], row.sigmas[k + 1]])
            row.taken += 1
        c = _column(pairs, x)
        dt = (c[:, 1] - c[:, 0]).view(-1, *([1] * (x.dim() - 1)))
        return x + dt * out

    def noise_coefficients(self, row: RowState) -> tuple[float, float]:
        sigma = row.sigmas[self.index(row)]
        return 1.0 - sigma, sigma


KINDS: tuple[type[UpdateKind], ...] = (DDIMKind, PNDMKind, EulerKind, EulerAncestralKind,
                                       DPMSolverKind, UniPCKind, FlowEulerKind)


def kind_for(scheduler) -> type[UpdateKind] | None:
    """The batched kind that covers this scheduler and configuration, if any."""
    for kind in KINDS:
        if kind.accepts(scheduler):
            return kind
    return None
