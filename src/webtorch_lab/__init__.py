"""The traffic lab: simulated upstreams, an open-loop load generator, scenarios that users write,
and a runner that puts WebTorch's balancing policies and nginx in front of the same upstreams and
load, then reports latency, success, retries, traffic shares and how fast faults are routed
around (``webtorch lab SCENARIO``).

Public API::

    from webtorch_lab import Lab, load_scenario, find_scenario, workdir

    scenario = load_scenario(find_scenario("slow-node"))
    with workdir() as work, Lab(work) as lab:
        result = lab.run_scenario(scenario)       # ScenarioResult: runs (RunMetrics), skipped

Tooling, not runtime: ``webtorch serve`` never imports it; its plots and progress bar need the
``lab`` extra (matplotlib, tqdm).
"""

from webtorch_lab.analysis import RunMetrics
from webtorch_lab.runner import Lab, ScenarioResult, workdir
from webtorch_lab.scenario import BalancerSpec, Scenario
from webtorch_lab.scenario import find as find_scenario
from webtorch_lab.scenario import load as load_scenario
from webtorch_lab.scenario import shipped as shipped_scenarios

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
