"""The stop decision of `PreemptionHandler` on several processes: only the last rank receives SIGTERM (after step 3),
and every rank must stop at that step.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... tests/ddp_preemption_worker.py

Each rank prints `rank R stopped at step S (SIGNAL)`.
"""

import os
import signal

from accelerate import Accelerator

from sadm.preemption import PreemptionHandler

accelerator = Accelerator()
with PreemptionHandler(timeout_s=60) as handler:
    for step in range(1, 11):
        if step == 3 and accelerator.process_index == accelerator.num_processes - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        if handler.should_stop(accelerator):
            break
print(f"rank {accelerator.process_index} stopped at step {step} ({handler.signal_name})", flush=True)
