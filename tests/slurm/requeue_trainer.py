"""A tiny resumable "training" run for the requeue tests.

Takes N steps of gradient descent on (w-3)^2 plus a step-dependent nudge; on SIGUSR1/SIGTERM (or at
--stop-at STEP, for tests without a signal) it saves a checkpoint and exits 99, and on the next
start it resumes from that checkpoint. ``--wait-at STEP`` holds the first start at that step until a
signal arrives, so a test's signal always lands mid-run however slowly it is delivered. Each start appends its first step to starts.txt. Under
torchrun every rank computes the same thing and only rank 0 writes files.
"""

import argparse
import json
import os
import signal
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("steps", type=int)
ap.add_argument("--stop-at", type=int, default=None)
ap.add_argument("--sleep", type=float, default=0.0)
ap.add_argument("--wait-at", type=int, default=None)
args = ap.parse_args()
CKPT = "ckpt.json"
WRITER = os.environ.get("RANK", "0") == "0"
state = json.load(open(CKPT)) if os.path.exists(CKPT) else {"step": 0, "w": 1.0, "losses": []}
if WRITER:
    with open("starts.txt", "a") as f:
        f.write(f"{state['step']}\n")
stop = False


def _on_signal(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGUSR1, _on_signal)
signal.signal(signal.SIGTERM, _on_signal)
first = state["step"]
while state["step"] < args.steps:
    if args.wait_at is not None and state["step"] == args.wait_at and first < args.wait_at:
        deadline = time.time() + 600
        while not stop and time.time() < deadline:
            time.sleep(0.05)
    if stop or (args.stop_at is not None and state["step"] == args.stop_at and first < args.stop_at):
        if WRITER:
            with open(CKPT + ".tmp", "w") as f:
                json.dump(state, f)
            os.replace(CKPT + ".tmp", CKPT)
        sys.exit(99)
    w = state["w"]
    state["w"] = w - 0.1 * 2 * (w - 3.0) + 0.01 * ((state["step"] * 7) % 5)
    state["step"] += 1
    state["losses"].append((state["w"] - 3.0) ** 2)
    if WRITER:
        with open("progress.tmp", "w") as f:
            f.write(str(state["step"]))
        os.replace("progress.tmp", "progress")
    time.sleep(args.sleep)
if WRITER:
    with open("final.json", "w") as f:
        json.dump({"loss": state["losses"][-1], "w": state["w"], "steps": state["step"],
                   "losses": state["losses"]}, f)
