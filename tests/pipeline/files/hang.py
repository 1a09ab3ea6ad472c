"""A process stage that answers its worker's pid, and never returns on the record "hang"."""

import os
import time

import webtorch


@webtorch.stage
def stall(records):
    if "hang" in records:
        time.sleep(3600)
    return [os.getpid() for _ in records]


pipeline = webtorch.Pipeline([stall])
