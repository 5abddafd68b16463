"""Stop a training run cleanly when the cluster asks: SIGTERM (SLURM preemption, Kubernetes pod eviction) or SIGUSR1
(SLURM's `--signal=USR1@<seconds>` warning before the time limit).

The handler only records the signal; the training loop asks [`PreemptionHandler.should_stop`] after every optimizer
step, writes a checkpoint there and returns without exporting (docs/RELIABILITY.md). Under several processes the
decision is agreed by all of them, so that all save the same step (saving is collective).
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import timedelta
from types import FrameType

import torch

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


def ignore_preemption_signals(worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: a worker ignores SIGTERM / SIGUSR1, which the main process turns into a checkpoint.

    SLURM and Kubernetes signal every process of the job; torch's worker handler dies on a SIGTERM that its parent did
    not send, and the main process then stops with "DataLoader worker exited unexpectedly" before it can checkpoint.
    A worker still exits when its parent shuts the loader down or dies (torch's watchdog), and on SIGKILL.
    """
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PreemptionHandler:
    r"""Record SIGTERM / SIGUSR1 while entered; the previous handlers are back on exit (also on an exception).

    Repeated signals are ignored: under `torchrun` / `accelerate launch` a worker can receive the cluster's SIGTERM and
    the launcher's forwarded one, and the second must not kill the checkpoint being written. SIGKILL (which follows the
    grace period: SLURM's KillWait, Kubernetes' terminationGracePeriodSeconds, torch elastic's 30 s) cannot be caught;
    the atomic checkpoint write keeps the previous checkpoint then.

    Agreement under several processes: one `int` all-reduced with MAX on every call, over a CPU (gloo) group: the default
    group when it is gloo, else one created on entry. It is a host-only round trip per optimizer step, no device sync:
    the ranks are already in step through the gradient all-reduce and the per-step finiteness check
    ([`~sadm.step.step_if_finite`]), so it costs the network latency, and a signal is acted on at the next optimizer
    step, which the grace period allows even for large models. Without gloo the flag is reduced on the accelerator
    device (one extra host sync per step). A single process reads its own flag: no collective.

    Args:
        signals (`tuple[signal.Signals, ...]`, defaults to SIGTERM and SIGUSR1): the signals that ask for a stop.
        timeout_s (`float`, *optional*): timeout of the gloo group (the run's `--ddp_timeout`: the non-main processes
            wait in this reduction while the main one draws a validation grid); torch's default when None.

    Example:
    ```python
    with PreemptionHandler() as preemption:
        for step in ...:
            ...
            if preemption.should_stop(accelerator):
                save_checkpoint(...)
                break
    ```
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS, timeout_s: float | None = None):
        self.signals = tuple(signals)
        self.timeout_s = timeout_s
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._group, self._device, self._group_ready = None, None, False

    # ------------------------------------------------------------------------------------------------- install/restore
    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionHandler entered outside the main thread: signals cannot be handled there.")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # only record: logging here could deadlock on a lock the interrupted code holds
        if self.received is None:
            self.received = signal.Signals(signum)

    # ---------------------------------------------------------------------------------------------------- the decision
    @property
    def requested(self) -> bool:
        """Whether this process received one of the signals."""
        return self.received is not None

    def should_stop(self, accelerator=None) -> bool:
        """Whether any process received a stop signal; call at the same point on every process (it is collective
        when `accelerator.num_processes > 1`). `accelerator` may be None for a single process."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.requested
        import torch.distributed as dist

        group, device = self._reduction_group(dist, accelerator.device)
        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        stop = bool(flag.item())
        if stop and not self.requested:
            self.received = self.signals[0]  # another process got it: this one stops at the same step
        return stop

    def _reduction_group(self, dist, device: torch.device):
        """(group, device) of the reduction: the default gloo group on CPU, else a gloo group created once (a
        collective call), else the default group on the accelerator device."""
        if not self._group_ready:
            self._group_ready = True
            if dist.get_backend() == "gloo":
                self._group, self._device = None, torch.device("cpu")
            elif dist.is_gloo_available():
                timeout = timedelta(seconds=self.timeout_s) if self.timeout_s is not None else None
                self._group, self._device = dist.new_group(backend="gloo", timeout=timeout), torch.device("cpu")
            else:
                self._group, self._device = None, device
        return self._group, self._device

    @property
    def signal_name(self) -> str:
        return self.received.name if self.received is not None else "none"
