"""LLM: the offline API. `LLM("profiles/cpu-default.yaml").generate(prompts, params)`."""
from __future__ import annotations

import time

from .config import EngineConfig
from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


def engine_config_from_profile(profile_path: str, overrides: list[str] | tuple[str, ...] = ()) -> EngineConfig:
    """profile -> ModelSpec -> plan -> EngineConfig, as `deploy up` does it (launcher/)."""
    from pagedeploy.launcher.engine_config import build_engine_config
    from pagedeploy.launcher.errors import UserError
    from pagedeploy.launcher.gpus import resolve_target
    from pagedeploy.launcher.model_resolve import resolve_model
    from pagedeploy.launcher.plan import plan
    from pagedeploy.launcher.profile import load_profile

    profile = load_profile(profile_path, overrides)
    spec = resolve_model(profile)
    memory_plan = plan(profile, spec, resolve_target(profile))
    if not memory_plan.fits:
        raise UserError(f"the memory plan does not fit: {memory_plan.verdict}",
                        "run `deploy plan` on the profile to see the terms and the fixes",
                        file=str(profile_path))
    return build_engine_config(profile, spec, memory_plan)


class LLM:
    def __init__(self, config: EngineConfig | str, **engine_kwargs):
        if isinstance(config, str):
            config = engine_config_from_profile(config)
        self.engine = LLMEngine(config, **engine_kwargs)
        self.engine.stream = False       # generate() returns final outputs only
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Final outputs, in the order of `prompts` (one prompt may be a string or a token-id list)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        if isinstance(params, list):
            assert len(params) == len(prompts), "one SamplingParams per prompt, or a single one for all"
        ids = []
        for i, prompt in enumerate(prompts):
            request_id = f"offline-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(request_id, prompt, params[i] if isinstance(params, list) else params)
            ids.append(request_id)
        finals = self._run(len(ids), use_tqdm)
        return [finals[i] for i in ids]

    def _run(self, total: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        start, last_print = time.perf_counter(), 0.0
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    finals[out.request_id] = out
            now = time.perf_counter()
            if use_tqdm and (now - last_print > 1.0 or len(finals) == total):
                stats = self.engine.stats()
                print(f"\r{len(finals)}/{total} requests  {stats.generation_tokens_total / (now - start):.1f} "
                      f"output tok/s  kv {stats.kv_usage:.0%}", end="", flush=True)
                last_print = now
        if use_tqdm:
            print()
        return finals
