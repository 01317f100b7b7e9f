"""Loss scalers for fp16 training (Megatron semantics).

The loss is multiplied by ``scale`` before backward; the optimizer multiplies the gradients by
``inv_scale``, checks them for inf/nan and calls ``update(found_inf)``. A ``DynamicGradScaler``
backs off after ``hysteresis`` overflowing steps and grows after ``growth_interval`` clean steps
in a row (``--loss-scale-window``).
"""

import torch

from megatron.errors import UserError


class _GradScaler:
    """Common part: the scale lives in a one-element fp32 tensor on the parameters' device."""

    def __init__(self, initial_scale, device=None):
        self._scale = torch.tensor([float(initial_scale)], dtype=torch.float32, device=device)

    @property
    def scale(self):
        return self._scale

    @property
    def inv_scale(self):
        # In double so that 1/scale is exact for every power-of-two scale, then back to fp32.
        return self._scale.double().reciprocal().float()

    def to(self, device):
        """Move the scale to ``device`` (the device of the parameters it scales)."""
        self._scale = self._scale.to(device)
        return self

    def update(self, found_inf):
        raise NotImplementedError

    def state_dict(self):
        raise NotImplementedError

    def load_state_dict(self, state_dict):
        raise NotImplementedError


class ConstantGradScaler(_GradScaler):
    """A fixed loss scale (``--loss-scale``). Overflowing steps are still skipped."""

    def __init__(self, scale, device=None):
        if not scale > 0:
            raise UserError(f"--loss-scale must be positive, got {scale}")
        super().__init__(scale, device)

    def update(self, found_inf):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        pass


class DynamicGradScaler(_GradScaler):
    """Megatron's dynamic loss scaler.

    On an overflow the growth counter restarts and the hysteresis counter drops by one; once it
    reaches zero every further overflow multiplies the scale by ``backoff_factor`` (never below
    ``min_scale``). After ``growth_interval`` consecutive clean steps the scale is multiplied by
    ``growth_factor`` and the hysteresis counter is refilled.
    """

    def __init__(self, initial_scale=2.0**32, min_scale=1.0, growth_factor=2.0,
                 backoff_factor=0.5, growth_interval=1000, hysteresis=2, device=None):
        if not initial_scale > 0:
            raise UserError(f"--initial-loss-scale must be positive, got {initial_scale}")
        if not min_scale > 0:
            raise UserError(f"--min-loss-scale must be positive, got {min_scale}")
        if min_scale > initial_scale:
            raise UserError(f"--min-loss-scale ({min_scale}) must not exceed "
                            f"--initial-loss-scale ({initial_scale})")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if not growth_interval > 0:
            raise UserError(f"--loss-scale-window must be positive, got {growth_interval}")
        if not hysteresis > 0:
            raise UserError(f"--hysteresis must be positive, got {hysteresis}")
        super().__init__(initial_scale, device)
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    def update(self, found_inf):
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = torch.clamp(self._scale * self.backoff_factor, min=self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale = self._scale * self.growth_factor

    def state_dict(self):
        return {
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state_dict):
        scale = torch.as_tensor(state_dict["scale"], dtype=torch.float32).reshape(1)
        self._scale = scale.to(self._scale.device).clone()
        self._growth_tracker = int(state_dict["growth_tracker"])
        self._hysteresis_tracker = int(state_dict["hysteresis_tracker"])
