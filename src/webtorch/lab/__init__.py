"""The traffic lab: simulated upstreams, an open-loop load generator, scenarios that users write,
and a runner that puts WebTorch's balancing policies and nginx in front of the same upstreams and
load, then reports latency, success, retries, traffic shares and how fast faults are routed
around (``webtorch lab SCENARIO``).

Public API::

    from webtorch.lab import Lab, load_scenario, find_scenario, workdir

    scenario = load_scenario(find_scenario("slow-node"))
    with workdir() as work, Lab(work) as lab:
        result = lab.run_scenario(scenario)       # ScenarioResult: runs (RunMetrics), skipped
"""

from webtorch.lab.analysis import RunMetrics
from webtorch.lab.runner import Lab, ScenarioResult, workdir
from webtorch.lab.scenario import BalancerSpec, Scenario
from webtorch.lab.scenario import find as find_scenario
from webtorch.lab.scenario import load as load_scenario
from webtorch.lab.scenario import shipped as shipped_scenarios

__all__ = [
    "BalancerSpec",
    "Lab",
    "RunMetrics",
    "Scenario",
    "ScenarioResult",
    "find_scenario",
    "load_scenario",
    "shipped_scenarios",
    "workdir",
]
