"""Play many simulated devices against the activity stream model, each its own WebSocket
stream of 50 Hz accelerometer samples (data.py), and report how well and how fast it answered.

    python -m webtorch.examples.activity.client [--url ws://127.0.0.1:8080] [--devices 50]
        [--seconds 30] [--fast] [--label-every 0]

Each device is another wearer doing activities in turn, sending its samples in real time (ten
ticks a second; ``--fast``: as fast as the server takes them). The model answers every 10th
sample with the activity of the last second; the report counts answers whose most probable
activity is the one being done (a window that spans a change of activity counts by its last
sample), and the time from a window's last sample sent to its answer. ``--label-every N``
sends the true activity for every Nth answer (a label, by the item's id), which trains the
model while it serves. Needs the ``websockets`` package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np

from webtorch.examples.activity.data import ACTIVITIES, RATE, stream

WINDOW, EVERY = 50, 10  # activity.py's stream: answers every 10th sample once 50 are in


@dataclass
class Report:
    devices: int = 0
    items: int = 0
    answers: int = 0
    right: int = 0
    trained: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        return (
            f"{self.devices} devices, {self.items} samples in {self.seconds:.1f} s "
            f"({self.items / max(self.seconds, 1e-9):.0f}/s), {self.answers} answers, "
            f"accuracy {self.right / max(self.answers, 1):.3f}, latency p50 "
            f"{np.percentile(lat, 50):.1f} ms p99 {np.percentile(lat, 99):.1f} ms, "
            f"{self.trained} labels trained, {len(self.errors)} errors"
        )


async def device(
    url: str, seconds: float, seed: int, fast: bool, label_every: int, report: Report
) -> None:
    from websockets.asyncio.client import connect

    samples, truth = stream(seconds, np.random.default_rng(seed))
    due = [i for i in range(len(samples)) if i + 1 >= WINDOW and (i + 1 - WINDOW) % EVERY == 0]
    sent_at: dict[int, float] = {}
    async with connect(f"{url}/v2/models/activity/stream", max_size=1 << 20) as ws:
        json.loads(await ws.recv())  # {"stream": id}
        done = asyncio.get_running_loop().create_future()

        async def read() -> None:
            outputs = trained = labels = failed = 0
            async for message in ws:
                answer = json.loads(message)
                if "outputs" in answer:
                    i = answer["id"]
                    outputs += 1
                    report.latencies.append(time.perf_counter() - sent_at.pop(i))
                    report.answers += 1
                    report.right += int(np.argmax(answer["outputs"]["probs"]) == truth[i])
                    if label_every and outputs % label_every == 0:
                        labels += 1
                        label = {"activity": int(truth[i])}
                        await ws.send(json.dumps({"for": i, "label": label}))
                elif "trained" in answer:
                    trained += 1
                    report.trained += 1
                else:
                    failed += 1
                    report.errors.append(str(answer.get("error", "?")))
                finished = outputs + failed >= len(due) and trained + failed >= labels
                if finished and not done.done():
                    done.set_result(None)

        reader = asyncio.create_task(read())
        start = time.perf_counter()
        per_tick = RATE // 10
        for i in range(0, len(samples), per_tick):
            if not fast:
                await asyncio.sleep(max(0.0, start + i / RATE - time.perf_counter()))
            for j in range(i, min(i + per_tick, len(samples))):
                sent_at[j] = time.perf_counter()
                await ws.send(json.dumps({"id": j, "x": samples[j].tolist()}))
                report.items += 1
        try:
            await asyncio.wait_for(done, timeout=60)
        finally:
            reader.cancel()


async def run(
    url: str, devices: int, seconds: float, fast: bool = False, label_every: int = 0
) -> Report:
    report = Report(devices=devices)
    start = time.perf_counter()
    await asyncio.gather(
        *(device(url, seconds, seed, fast, label_every, report) for seed in range(devices))
    )
    report.seconds = time.perf_counter() - start
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8080")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--fast", action="store_true", help="no real-time pacing")
    parser.add_argument("--label-every", type=int, default=0)
    args = parser.parse_args()
    report = asyncio.run(run(args.url, args.devices, args.seconds, args.fast, args.label_every))
    print(report.summary())
    print("activities:", ", ".join(ACTIVITIES))


if __name__ == "__main__":
    main()
