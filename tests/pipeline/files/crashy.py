"""A stage whose worker process dies on the record "die" (served only with placement =
"process": on the loop it would take the server down, which is why processes exist)."""

import os

import webtorch


@webtorch.stage
def risky(records):
    if "die" in records:
        os._exit(3)
    return [str(r).upper() for r in records]


pipeline = webtorch.Pipeline([risky])
