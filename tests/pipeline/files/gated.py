"""A pipeline whose first stage holds any batch with a "wait" record until the test opens
GATE (tests reach these events through the imported file: import_pipeline_file caches it)."""

import threading

import webtorch

GATE = threading.Event()
ENTERED = threading.Event()


@webtorch.stage
def hold(docs):
    if "wait" in docs:
        ENTERED.set()
        GATE.wait(30)
    return docs


@webtorch.stage
def upper(docs):
    return [str(d).upper() for d in docs]


pipeline = webtorch.Pipeline([hold, upper])
