"""A training step of the demo's model (`make demo`'s recipe: tiny preset, 2x2 patches, batch 32, CPU), eager against
`--compile inductor`. The compiled provider records its compile time (the first steps, until no more recompiles)
in extra_info; the table's ratio is the step time after it. Whether compiling pays inside a run is then
compile time / (eager step - compiled step) steps.

The inductor case compiles for minutes on 2 cores, so it runs only when benchmarks are timed (`make bench`); the
flag's correctness is tested in python_tests/test_train.py.
"""

import time

import pytest

from raphael_ext.evaluation.demo import demo_config
from raphael_ext.training.trainer import Trainer

WARM_STEPS = 3  # steps before timing: compiles (a second shape would recompile once more) and allocator warm-up


@pytest.mark.parametrize("provider", ["eager", "inductor"])
def test_demo_training_step(run, benchmark, tmp_path, provider):
    if provider == "inductor" and benchmark.disabled:
        pytest.skip("inductor compiles the model for minutes: timed runs only (make bench)")
    benchmark.group = "demo training step, tiny preset, patch 2, batch 32, cpu"
    trainer = Trainer(demo_config(tmp_path, steps=100, compile="none" if provider == "eager" else provider),
                      device="cpu")
    started = time.perf_counter()
    for step in range(WARM_STEPS):
        trainer.train_step(step)
    warm_s = time.perf_counter() - started
    steps = iter(range(WARM_STEPS, 10_000))
    run(lambda: trainer.train_step(next(steps)), "cpu", rounds=8)
    benchmark.extra_info.update(group=benchmark.group, provider=f"--compile {provider}" if provider != "eager" else
                                "eager", device="cpu", first_steps_s=round(warm_s, 1))
