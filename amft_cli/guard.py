"""The non-finite guard: a NaN or inf never reaches the weights, the optimizer or μ.

train_step asks three questions, each a call around its own code:

1. `nonfinite_signal` before the controller and the update: are the step's
   losses and gradients finite? If not, the step is skipped: weights,
   optimizer state and μ stay as they were; the batch counts as consumed.
2. `KeepFinite` around the method's control hook (AMFT's μ controller): a
   μ, H* or controller term that came out non-finite is rolled back and the
   step skipped the same way. Around the method's after_update hook (which
   runs after the weights moved) a non-finite state is rolled back and
   logged as guard/rolled_back.
3. `check_weights` at the end of the step: finite gradients at a finite
   learning rate can still overflow the weights (lr ~1e38), and a method may
   step its own optimizer; the run then stops before any checkpoint is
   written.

Skipped steps are logged (`optim/skipped` = 1 and the honest, non-finite
`optim/grad_norm`, written as null); `count_skip` stops the run with one line
after train.max_skipped_steps in a row, keeping the last checkpoint.
"""

from __future__ import annotations

import math

import torch


class Diverged(ValueError):
    """Training produced only non-finite values for too long; printed as one line."""


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (e.g. a norm over FSDP shards, reduced over the processes); else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grad_norm(grads: list[torch.Tensor | None]) -> float:
    """Global L2 norm of a gradient list (inf or NaN when any entry is); FSDP shards included."""
    norms = [whole(torch.linalg.vector_norm(g.float())) for g in grads if g is not None]
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
    """Run one of a method's hooks (AMFT's μ controller); if a float of the method's state comes
    out NaN or inf (μ, H*, a controller term), load the state from before and record why in
    .problem. Tensors in the state (a method's own optimizer) are neither copied nor checked:
    check_weights sees what they do to the weights."""

    def __init__(self, method) -> None:
        self.method, self.problem = method, None

    def __enter__(self) -> KeepFinite:
        self.saved = _copy_containers(self.method.state_dict())
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            return
        bad = _nonfinite_float(self.method.state_dict())
        if bad is not None:
            self.problem = f"the method's {bad[0]} came out {bad[1]}"
            self.method.load_state_dict(self.saved)


def _copy_containers(state):
    """A copy of nested dicts and lists; leaves (floats, strings, tensors) are shared, not copied."""
    if isinstance(state, dict):
        return {k: _copy_containers(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_copy_containers(v) for v in state)
    return state


def _nonfinite_float(state, key: str = "") -> tuple[str, float] | None:
    """(key, value) of the first NaN or inf float in a nested state, else None."""
    if isinstance(state, float):
        return None if math.isfinite(state) else (key, state)
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for k, v in items:
        found = _nonfinite_float(v, f"{key}.{k}" if key else str(k))
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
                       "and every checkpoint written is finite: lower train.lr or check the data")
    return in_row


def check_weights(params: list[torch.Tensor], step: int) -> None:
    """Stop before a non-finite weight can be saved (an update overflowed them)."""
    if not math.isfinite(grad_norm([p.detach() for p in params])):  # NaN/inf in any weight, or overflow
        raise Diverged(f"training diverged: the update of step {step + 1} made weights non-finite "
                       "(not saved; every checkpoint written is finite): lower train.lr")
