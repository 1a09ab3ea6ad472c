"""torch (~180 MiB resident, ~1 s to import) loads only when a model or the guard needs it: a
server that only proxies must not pay for it."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _modules_after(code: str) -> set[str]:
    script = textwrap.dedent(code) + "\nimport sys\nprint(' '.join(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return set(out.split())


def test_a_proxy_only_server_never_imports_torch() -> None:
    modules = _modules_after(
        """
        import asyncio
        from webtorch import cli, config
        from webtorch.app import App

        cfg = config.from_dict({
            "upstreams": {"backend": {"servers": ["127.0.0.1:9"]}},
            "routes": [
                {"prefix": "/", "upstream": "backend"},
                {"path": "/fixed", "return": 200, "body": "{}"},
            ],
        })

        async def main() -> None:
            app = App(cfg)
            app.build_handler(asyncio.get_running_loop())

        asyncio.run(main())
        """
    )
    assert "webtorch.app" in modules
    assert "torch" not in modules


def test_the_guard_scores_without_torch() -> None:
    # Its network trains in torch, but serving scores in numpy: torch only comes with online
    # adaptation (feedback), which fine-tunes.
    modules = _modules_after(
        """
        from webtorch import config
        from webtorch.guard.clients import N_CLIENT
        from webtorch.guard.features import RequestView
        from webtorch.guard.build import make_guard
        from webtorch.guard.plugin import GuardPlugin

        cfg = config.from_dict({"guard": {"mode": "enforce"}})
        guard = make_guard(cfg.guard, cfg.base_dir)
        assert guard.scorer is not None
        view = RequestView("GET", "/search", "q=1' OR '1'='1", [(b"host", b"x")], b"")
        injection, abuse = guard.scorer.score_one(view, [0.0] * N_CLIENT)
        assert injection > 0.5, injection
        """
    )
    assert "webtorch.guard.scorer" in modules
    assert "torch" not in modules


def test_a_model_file_still_finds_webtorch_model() -> None:
    modules = _modules_after(
        """
        import webtorch
        assert webtorch.Model.__name__ == "Model" and webtorch.TensorSpec.__name__ == "TensorSpec"
        """
    )
    assert "torch" in modules
