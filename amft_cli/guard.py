"""The non-finite guard: a NaN or inf never reaches the weights, the optimizer or μ.

train_step asks three questions, each a call around its own code:

1. `nonfinite_signal` before the controller and the update: are the step's
   losses and gradients finite? If not, the step is skipped: weights,
   optimizer state and μ stay as they were; the batch counts as consumed.
2. `KeepFinite` around the method's control hook (AMFT's μ controller): a
   μ, H* or controller term that came out non-finite is rolled back and the
   step skipped the same way.
3. `check_weights` after the update: finite gradients at a finite learning
   rate can still overflow the weights (lr ~1e38); the run then stops before
   any checkpoint is written.

Skipped steps are logged (`optim/skipped` = 1 and the honest, non-finite
`optim/grad_norm`, written as null); `count_skip` stops the run with one line
after train.max_skipped_steps in a row, keeping the last checkpoint.
"""

from __future__ import annotations

import copy
import math

import torch


class Diverged(ValueError):
    """Training produced only non-finite values for too long; printed as one line."""


def grad_norm(grads: list[torch.Tensor | None]) -> float:
    """Global L2 norm of a gradient list (inf or NaN when any entry is)."""
    norms = [torch.linalg.vector_norm(g.float()) for g in grads if g is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def nonfinite_signal(metrics: dict, g_sft: list | None, g_rl: list | None) -> tuple[str | None, float]:
    """(what is not finite, or None; the global norm of the step's raw gradients) of its losses
    and gradients."""
    norms = {key: grad_norm(g) for key, g in (("loss/sft", g_sft), ("loss/rl", g_rl)) if g is not None}
    total = math.sqrt(sum(n * n for n in norms.values()))  # NaN and inf carry through
    for key in ("loss/sft", "loss/rl"):
        if key in metrics and not math.isfinite(metrics[key]):
            return f"{key} is {metrics[key]}", total
    for key, norm in norms.items():
        if not math.isfinite(norm):
            return f"the gradient of {key} is not finite", total
    return None, total


class KeepFinite:
    """Run a method's control hook (AMFT's μ controller); if the method's state comes out NaN or
    inf anywhere (μ, H*, a term), load the state from before and record why in .problem."""

    def __init__(self, method) -> None:
        self.method, self.problem = method, None

    def __enter__(self) -> KeepFinite:
        self.saved = copy.deepcopy(self.method.state_dict())
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            return
        bad = _nonfinite_entry(self.method.state_dict())
        if bad is not None:
            self.problem = f"the method's {bad[0]} came out {bad[1]}"
            self.method.load_state_dict(self.saved)


def _nonfinite_entry(state, key: str = "state") -> tuple[str, object] | None:
    """(key, value) of the first NaN or inf in a nested state (floats and tensors), else None."""
    if isinstance(state, float) and not math.isfinite(state):
        return key, state
    if isinstance(state, torch.Tensor) and state.is_floating_point() and not torch.isfinite(state).all():
        return key, "non-finite"
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for k, v in items:
        found = _nonfinite_entry(v, str(k) if key == "state" else f"{key}.{k}")
        if found is not None:
            return found
    return None


def skipped(metrics: dict, reason: str, norm: float) -> dict:
    """The metrics of a skipped step: what was measured, the reason, and the honest norm."""
    return {**metrics, "optim/skipped": 1.0, "optim/grad_norm": norm, "optim/skip_reason": reason}


def count_skip(metrics: dict, in_row: int, limit: int, step: int, on_message) -> int:
    """Consecutive skipped steps after this one; raises Diverged at `limit`."""
    if not metrics.get("optim/skipped"):
        return 0
    in_row += 1
    on_message(f"step {step}: skipped ({metrics['optim/skip_reason']}); weights, optimizer and μ "
               f"unchanged ({in_row} in a row, the run stops at {limit})")
    if in_row >= limit:
        raise Diverged(f"training diverged: {in_row} steps in a row up to step {step} were not finite "
                       f"({metrics['optim/skip_reason']}); no weight was touched since step {step - in_row} "
                       "and the last checkpoint is kept: lower train.lr or check the data")
    return in_row


def check_weights(params: list[torch.Tensor], step: int) -> None:
    """Stop before a non-finite weight can be saved (an update overflowed them)."""
    if not math.isfinite(grad_norm([p.detach() for p in params])):  # NaN/inf in any weight, or overflow
        raise Diverged(f"training diverged: the update of step {step + 1} made weights non-finite "
                       "(nothing saved since; the last checkpoint is kept): lower train.lr")
