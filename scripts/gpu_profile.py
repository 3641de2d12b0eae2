"""Where a step's time goes on the GPU: cProfile of the offline bench (host side) plus a
torch.profiler trace summary (device kernels). Run on the device machine; writes under $OUT."""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys

from pagedeploy.launcher.bench import make_workload
from pagedeploy.runtime.engine import LLMEngine
from pagedeploy.runtime.llm import engine_config_from_profile
from pagedeploy.runtime.sampling_params import SamplingParams


def main(profile: str, num_requests: int) -> None:
    config = engine_config_from_profile(profile)
    engine = LLMEngine(config)
    work = make_workload(num_requests, (100, 1024), (100, 1024), 0, config.spec.vocab_size)
    for i, r in enumerate(work):
        engine.add_request(str(i), r.prompt_token_ids,
                           SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True))
    prof = cProfile.Profile()
    prof.enable()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(35)
    out = os.environ.get("OUT", ".")
    open(os.path.join(out, "cprofile.txt"), "w").write(text.getvalue())
    print(f"steps {steps}")
    print(text.getvalue()[:9000])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 256)
