"""The per-cluster state machine: absent → cluster → cni → gateway → certs → locked → meshed.

Built with ``transitions`` ordered transitions. Side effects happen in ``before`` (a raise there
leaves the state unchanged); the record is written in ``after_state_change``. Before a transition
moves on, its own gate and the gates of every earlier state must hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from transitions import Machine

from lab import logs
from lab.errors import Interrupted, LabError, StepFailed
from lab.state import STATES, Transition, now_iso
from lab.steps.base import CANCELLED, Step, StepContext, Verdict
from lab.ui import Progress


class ClusterPipeline:
    """The model the machine drives for one cluster."""

    state: str  # set by transitions
    advance: Callable[[], bool]  # the ordered-transitions trigger, added by transitions

    def __init__(self, ctx: StepContext, steps: Mapping[str, Step], progress: Progress) -> None:
        self.ctx = ctx
        self.steps = steps
        self.progress = progress
        self.log = ctx.log
        self._current: Transition | None = None
        self._started = 0.0
        self.machine = Machine(
            model=self, states=list(STATES), initial=STATES[0], auto_transitions=True,
            send_event=True, after_state_change="_persist",
        )
        # Ordered transitions are laid out from the initial state, so build from `absent` and
        # only then move to where the record says the cluster is.
        self.machine.add_ordered_transitions(
            list(STATES), trigger="advance", loop=False, prepare="_begin", before="_enter")
        self.machine.set_state(ctx.record.state)

    # -- callbacks --------------------------------------------------------------------------------

    def _begin(self, event: Any) -> None:
        self._record_attempt(event.transition.dest, event.transition.source)

    def _record_attempt(self, name: str, source: str) -> None:
        """Record the attempt before any side effect, so a crash inside it is visible later."""
        self._current = Transition(name=name, source=source, started=now_iso())
        self._started = time.monotonic()
        self.ctx.record.history.append(self._current)
        self.ctx.store.save(self.ctx.record)

    def _enter(self, event: Any) -> None:
        self._run_recorded(event.transition.dest)

    def _run_recorded(self, name: str) -> None:
        """Run a step; on failure close the recorded attempt with its outcome and re-raise."""
        try:
            self.run_step(name)
        except BaseException as exc:
            # A Ctrl-C reaches the main thread only; the other clusters' threads see CANCELLED
            # (their gate waits raise Interrupted, a tool killed by the same SIGINT fails).
            interrupted = (isinstance(exc, Interrupted) or not isinstance(exc, Exception)
                           or CANCELLED.is_set())
            self._close(outcome="interrupted" if interrupted else "failed", error=str(exc))
            self.ctx.store.save(self.ctx.record)
            raise

    def _persist(self, event: Any) -> None:
        trigger = event.event.name
        if trigger.startswith("to_"):  # a step back after drift
            self.ctx.record.history.append(Transition(
                name=self.state, source=event.transition.source, started=now_iso(),
                finished=now_iso(), seconds=0.0, outcome="stepped-back",
                error=str(event.kwargs.get("reason", "")) or None))
        else:
            self._close(outcome="ok")
        self.ctx.record.state = self.state
        self.ctx.store.save(self.ctx.record)

    def _close(self, outcome: str, error: str | None = None) -> None:
        if self._current is None:
            return
        self._current.finished = now_iso()
        self._current.seconds = round(time.monotonic() - self._started, 3)
        self._current.outcome = outcome
        self._current.error = error
        self.log.info("step.finished", step=self._current.name, outcome=outcome,
                      seconds=self._current.seconds,
                      **({"error": error.splitlines()[0]} if error else {}))
        self._current = None

    # -- work -------------------------------------------------------------------------------------

    def run_step(self, name: str) -> None:
        """Apply a step and wait for its gate and every earlier one. Raises on failure."""
        step = self.steps[name]
        logs.bind(step=name)
        try:
            with self.progress.step(self.ctx.cluster.name, step.title):
                try:
                    step.apply(self.ctx)
                except LabError:
                    raise
                except Exception as exc:  # wrap with what was being done
                    raise StepFailed(
                        f"{step.title} failed: {exc!r}",
                        "see the log above; then run `invoke lab.up --resume`") from exc
                for gate_name in STATES[1:STATES.index(name) + 1]:
                    gate = self.steps[gate_name]
                    verdict = self.ctx.wait_for(lambda g=gate: g.ready(self.ctx),  # type: ignore[misc]
                                                self.ctx.timeouts.for_gate(gate_name),
                                                f"the {gate_name} gate")
                    self.remember(gate_name, verdict)
        finally:
            logs.unbind("step")

    def remember(self, gate: str, verdict: Verdict) -> None:
        self.ctx.record.gates[gate] = {**verdict.to_json(), "checked": now_iso()}

    def reconcile(self, name: str) -> None:
        """Re-apply a completed step in place (plain `lab.up`): state stays, history records it."""
        self._record_attempt(name, name)
        self._run_recorded(name)
        self._close(outcome="ok")
        self.ctx.store.save(self.ctx.record)

    def step_back(self, to: str, reason: str) -> None:
        self.log.warning("state.drift", reason=reason, stepping_back_to=to)
        self.progress.note(f"! {self.ctx.cluster.name}: {reason}; stepping back to `{to}`")
        getattr(self, f"to_{to}")(reason=reason)
