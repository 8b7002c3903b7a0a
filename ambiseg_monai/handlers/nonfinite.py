"""Stop (or skip the step) when training produces NaN or infinite values, before anything non-finite is saved.

:class:`NonFiniteGuard` is attached to a MONAI ``SupervisedTrainer`` like any other train handler. It checks

- the loss and the gradients after the backward pass and *before* the optimiser step
  (``IterationEvents.BACKWARD_COMPLETED``): a non-finite step is never applied, so the weights, the EMA
  weights and every checkpoint written afterwards stay finite;
- the weights (parameters and buffers) after each step (``Events.ITERATION_COMPLETED``, before the EMA
  update and the epoch checkpoint when the guard is listed before them), in case a finite gradient still
  produced a non-finite update;
- errors inside the forward pass that a divergence causes (``torch.distributions`` refusing a NaN scale):
  they are re-raised as :class:`NonFiniteTrainingError` with the same kind of message;
- the validator of the trainer's ``ValidationHandler`` (found when training starts): the weights it evaluates
  before each validation, and its key metric before it is compared with the best one, so a NaN metric is
  never logged as a new best and never selects a ``model.pt``.

On a non-finite value it raises :class:`NonFiniteTrainingError`, whose one-line message names the epoch,
the iteration and what was non-finite; ``python -m monai.bundle run`` then exits with status 1.
With ``on_nonfinite="skip"`` a step with a non-finite loss or gradient is skipped instead (logged as a
warning) and the run stops when more than ``max_consecutive_skips`` such steps come in a row; non-finite weights
or a non-finite validation metric always stop the run.

Under distributed training every rank reaches the same decision (the flag is all-reduced), so no rank
waits forever for another that stopped.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from ambiseg_monai.networks.denoisers import unwrap_network

__all__ = ["NonFiniteGuard", "NonFiniteTrainingError", "nonfinite_tensors"]

logger = logging.getLogger(__name__)

_ACTIONS = ("stop", "skip")
# first lines of errors raised by a forward pass fed with NaN/Inf activations
_NONFINITE_ERRORS = ("but found invalid values", "contains either `inf`, `nan` or element < 0")
_ADVICE = "lower the learning rate (--learning_rate), clip the gradients or check the data"


class NonFiniteTrainingError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient, weight or validation metric."""


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor | None]]) -> list[str]:
    """Names of the floating-point tensors in ``named`` that hold a NaN or an infinity (None entries are skipped).

    One ``torch._foreach_norm`` call (the max-abs norm, which cannot overflow on finite values) and one
    host sync; the tensors are named only when something is non-finite.
    """
    items = [(name, t.detach()) for name, t in named if t is not None and torch.is_floating_point(t) and t.numel()]
    if not items:
        return []
    norms = torch._foreach_norm([t for _, t in items], math.inf)
    if bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all()):
        return []
    return [name for (name, _), norm in zip(items, norms, strict=True) if not bool(torch.isfinite(norm))]


def _describe(names: Sequence[str], total: int, what: str) -> str:
    example = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
    return f"{what} of {len(names)} of {total} tensors are non-finite (e.g. {example})"


def _named_state(network: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(unwrap_network(network).state_dict(keep_vars=False).items())


def _any_rank(flag: bool, device: torch.device | None) -> bool:
    """True when ``flag`` is True on any rank of an initialised process group (else ``flag``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    if torch.distributed.get_world_size() < 2:
        return flag
    backend = torch.distributed.get_backend()
    on = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=on)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def _loss_terms(output) -> tuple[float | None, dict[str, float]]:
    """The total loss and the non-finite named loss terms of a trainer's (non-decollated) output."""
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    if not isinstance(output, Mapping):
        return None, {}
    loss = output.get(CommonKeys.LOSS)
    value = None if loss is None else float(torch.as_tensor(loss).detach().float().mean())
    terms: dict[str, float] = {}
    pred = output.get(CommonKeys.PRED)
    if isinstance(pred, Mapping):
        for name, term in pred.items():
            if isinstance(name, str) and name.startswith("l_") and torch.is_tensor(term) and term.is_floating_point():
                mean = float(term.detach().float().mean())
                if not math.isfinite(mean):
                    terms[name] = mean
    return value, terms


class NonFiniteGuard:
    """Stop training (or skip the step) on a NaN/Inf loss or gradient; never let a non-finite model be saved.

    List it in the trainer's handlers before the EMA handler (so a non-finite step is caught before the
    EMA absorbs it); its checks need no other order. See the module docstring for what is checked when.

    Args:
        on_nonfinite: ``"stop"`` (default): raise :class:`NonFiniteTrainingError` at the first non-finite
            loss or gradient; ``"skip"``: drop that step's gradients (the optimiser step changes nothing;
            under a CUDA ``GradScaler`` the scaler skips it) and go on.
        max_consecutive_skips: with ``"skip"``, stop when more non-finite steps than this come in a row.
        check_weights: check the weights after every optimiser step (one fused reduction per step).
        validator: the evaluator whose weights and key metric are checked; default: the validator of the
            trainer's ``ValidationHandler``, found when training starts (none: no validation checks).
        networks: further networks whose weights are checked with the trainer's (e.g. an EMA copy).
    """

    def __init__(
        self,
        on_nonfinite: str = "stop",
        max_consecutive_skips: int = 10,
        check_weights: bool = True,
        validator: Engine | None = None,
        networks: Sequence[torch.nn.Module] | Mapping[str, torch.nn.Module] | None = None,
    ) -> None:
        if on_nonfinite not in _ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {_ACTIONS}, got {on_nonfinite!r}.")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be at least 1, got {max_consecutive_skips}.")
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.check_weights = check_weights
        self.validator = validator
        if isinstance(networks, Mapping):
            self.networks = dict(networks)
        else:
            self.networks = {f"network {i}": n for i, n in enumerate(networks or ())}
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._trainer: Engine | None = None
        self._validator_attached: Engine | None = None

    # ------------------------------------------------------------------------------------------ attach
    def attach(self, engine: Engine) -> None:
        if IterationEvents.BACKWARD_COMPLETED not in engine._allowed_events:
            engine.register_events(*IterationEvents, event_to_attr=None)
        self._trainer = engine
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.after_backward)
        if self.check_weights:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.after_step)
        engine.add_event_handler(Events.STARTED, self._attach_validator)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.on_exception)

    def _attach_validator(self, engine: Engine) -> None:
        validator = self.validator if self.validator is not None else _find_validator(engine)
        if validator is None or validator is self._validator_attached:
            return
        self._validator_attached = validator
        validator.add_event_handler(Events.STARTED, self.before_validation)
        validator.add_event_handler(Events.EPOCH_COMPLETED, self.after_validation)
        _move_before(validator, Events.EPOCH_COMPLETED, self.after_validation, "_compare_metrics")

    # ------------------------------------------------------------------------------------------ checks
    def _where(self, engine: Engine) -> str:
        state = engine.state
        return f"epoch {state.epoch}, iteration {state.iteration}"

    def after_backward(self, engine: Engine) -> None:
        """Check the loss and the gradients; stop, or skip the optimiser step, when one is non-finite."""
        problems: list[str] = []
        loss, terms = _loss_terms(engine.state.output)
        if loss is not None and not math.isfinite(loss):
            detail = ", ".join(f"{k}={v}" for k, v in terms.items())
            problems.append(f"the loss is {loss}" + (f" ({detail})" if detail else ""))
        scaler = getattr(engine, "scaler", None)
        scaled = bool(getattr(engine, "amp", False)) and scaler is not None and scaler.is_enabled()
        params = _named_trainable(engine)
        if not scaled:  # under a GradScaler, overflowing (scaled) gradients are the scaler's business
            bad = nonfinite_tensors((name, p.grad) for name, p in params)
            if bad:
                total = sum(p.grad is not None for _, p in params)
                problems.append(_describe(bad, total, "the gradients"))
        if not _any_rank(bool(problems), engine.state.device):
            self.consecutive_skips = 0
            return
        what = "; ".join(problems) or "another rank found a non-finite loss or gradient"
        if self.on_nonfinite == "stop":
            raise NonFiniteTrainingError(
                f"non-finite training step at {self._where(engine)}: {what}. Training stopped; the step was not "
                f"applied and nothing non-finite was saved. To fix: {_ADVICE}; or skip such steps "
                "(bundles: --nonfinite_action skip)."
            )
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteTrainingError(
                f"{self.consecutive_skips} non-finite training steps in a row, the last at {self._where(engine)}: "
                f"{what}. Training stopped; nothing non-finite was saved. To fix: {_ADVICE}."
            )
        _drop_gradients(engine, scaled)
        logger.warning(
            f"skipped a non-finite training step at {self._where(engine)}: {what} "
            f"({self.consecutive_skips} in a row, {self.skipped_steps} in all; more than "
            f"{self.max_consecutive_skips} in a row stop the run)"
        )

    def on_exception(self, engine: Engine, error: BaseException) -> None:
        """Name a divergence that surfaces as an error inside the forward pass (e.g. ``torch.distributions``
        refusing a NaN scale) as such; pass every other error on unchanged."""
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if not isinstance(error, NonFiniteTrainingError) and any(p in first_line for p in _NONFINITE_ERRORS):
            weights = self._weight_problems(engine)
            cause = "; ".join(weights) if weights else "the weights are finite, but the last steps made them too large"
            match = re.search(r"Expected parameter (\w+) .*? of distribution (\w+)", first_line)
            short = f"{match.group(2)} got invalid values for {match.group(1)}" if match else first_line[:160]
            raise NonFiniteTrainingError(
                f"training diverged at {self._where(engine)}: the forward pass produced non-finite values "
                f"({type(error).__name__}: {short}); {cause}. Training stopped; nothing non-finite "
                f"was saved. To fix: {_ADVICE}."
            ) from error
        # ignite swallows the error when no EXCEPTION_RAISED handler raises it: the last one must
        if engine._event_handlers[Events.EXCEPTION_RAISED][-1][0] == self.on_exception:
            raise error

    def _networks(self, engine: Engine | None, with_validator: bool) -> dict[str, torch.nn.Module]:
        networks: dict[str, torch.nn.Module] = {}
        if engine is not None and isinstance(getattr(engine, "network", None), torch.nn.Module):
            networks["network"] = engine.network
        validator = self._validator_attached or self.validator
        other = getattr(validator, "network", None) if with_validator else None
        if isinstance(other, torch.nn.Module) and all(
            unwrap_network(other) is not unwrap_network(n) for n in networks.values()
        ):
            networks["validated network (e.g. the EMA copy)"] = other
        for name, network in self.networks.items():
            if all(unwrap_network(network) is not unwrap_network(n) for n in networks.values()):
                networks[name] = network
        return networks

    def _weight_problems(self, engine: Engine | None, with_validator: bool = False) -> list[str]:
        problems = []
        for label, network in self._networks(engine, with_validator).items():
            state = _named_state(network)
            bad = nonfinite_tensors(state)
            if bad:
                problems.append(_describe(bad, len(state), f"the weights of the {label}"))
        return problems

    def after_step(self, engine: Engine) -> None:
        """Stop when the optimiser step left a non-finite weight (before the EMA and checkpoints see it)."""
        problems = self._weight_problems(engine)
        if _any_rank(bool(problems), engine.state.device):
            raise NonFiniteTrainingError(
                f"non-finite weights after the optimiser step at {self._where(engine)}: "
                f"{'; '.join(problems) or 'on another rank'}. Training stopped before they were saved. "
                f"To fix: {_ADVICE}."
            )

    def before_validation(self, evaluator: Engine) -> None:
        """Refuse to validate (and so to save ``model.pt`` from) non-finite weights."""
        problems = self._weight_problems(self._trainer, with_validator=True)
        if problems:
            epoch = self._trainer.state.epoch if self._trainer is not None else evaluator.state.epoch
            raise NonFiniteTrainingError(
                f"non-finite weights before the validation after epoch {epoch}: {'; '.join(problems)}. "
                f"Training stopped; no model.pt was written from them. To fix: {_ADVICE}."
            )

    def after_validation(self, evaluator: Engine) -> None:
        """Stop before a non-finite key metric is compared with the best one (no 'new best', no ``model.pt``)."""
        name = getattr(evaluator.state, "key_metric_name", None)
        if name is None:
            return
        value = evaluator.state.metrics.get(name)
        try:
            number = float(value)
        except (TypeError, ValueError):
            return  # not a scalar: MONAI does not compare it either
        if math.isfinite(number):
            return
        epoch = self._trainer.state.epoch if self._trainer is not None else evaluator.state.epoch
        raise NonFiniteTrainingError(
            f"the validation after epoch {epoch} gave a non-finite key metric: {name} = {number}. "
            "Training stopped; it was not recorded as a new best and no model.pt was written from it. "
            "Check the validation data and the metric's inputs."
        )


# ---------------------------------------------------------------------------------------------- helpers
def _named_trainable(engine: Engine) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter the optimiser updates, named after the trainer's network."""
    network = getattr(engine, "network", None)
    module = unwrap_network(network) if isinstance(network, torch.nn.Module) else None
    names = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return list(module.named_parameters()) if module is not None else []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [(names.get(id(p), f"parameter {i}"), p) for i, p in enumerate(params)]


def _drop_gradients(engine: Engine, scaled: bool) -> None:
    """Make the coming optimiser step a no-op for this iteration."""
    for group in engine.optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if scaled:
                p.grad.fill_(math.nan)  # GradScaler.step sees an overflow and skips the step
            else:
                p.grad = None  # optimisers skip parameters without a gradient


def _find_validator(engine: Engine) -> Engine | None:
    """The validator of a MONAI ``ValidationHandler`` attached to ``engine`` (None without one)."""
    from monai.handlers import ValidationHandler

    for handlers in engine._event_handlers.values():
        for entry in handlers:
            handler = entry[0]
            parent = getattr(handler, "_parent", None)  # ignite's wrapper of a filtered event (every=N)
            candidates = (handler, getattr(handler, "__wrapped__", None), parent() if callable(parent) else None)
            for candidate in candidates:
                owner = getattr(candidate, "__self__", candidate)
                if isinstance(owner, ValidationHandler) and owner.validator is not None:
                    return owner.validator
    return None


def _move_before(engine: Engine, event, handler, before_name: str) -> None:
    """Move the just-added ``handler`` of ``event`` in front of the handler function named ``before_name``.

    Ignite runs the handlers of an event in the order they were added; the validator's metrics are
    computed, then compared with the best (MONAI's ``_compare_metrics``), then the validation handlers
    (``CheckpointSaver``) run. The check must sit between the first two. Left last when there is no
    such handler (then no key metric is compared either).
    """
    entries = engine._event_handlers[event]
    index = next((i for i, entry in enumerate(entries) if getattr(entry[0], "__name__", "") == before_name), None)
    mine = next((i for i, entry in enumerate(entries) if entry[0] == handler), None)
    if index is None or mine is None or mine < index:
        return
    entries.insert(index, entries.pop(mine))
