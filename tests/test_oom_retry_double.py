"""The kohya double's out-of-memory knobs (KOHYA_DOUBLE_OOM_*), run as the daemon runs kohya: what they print is
what torch prints, and the daemon's classifier reads it as out_of_memory (GPU or RAM)."""

from __future__ import annotations

from typing import Any

from daemon.pipeline.failure import classify_failure
from daemon.pipeline.progress import OutputParser
from tests.test_kohya_double import Job, job  # noqa: F401  (the double's fixture)


def classify(res: Any, *, cpu: bool) -> Any:
    parser = OutputParser()
    parser.feed("stdout", res.stdout)
    parser.feed("stderr", res.stderr)
    parser.finish()
    lines = (res.stdout + res.stderr).replace("\r", "\n").splitlines()
    return classify_failure(exit_code=res.returncode, cancelled=False, model_saved=parser.tracker.model_saved,
                            output_exists=False, errors=parser.tracker.errors, tail=lines[-40:], on_gpu=not cpu)


def test_the_double_runs_out_of_gpu_memory_above_the_batch_like_torch(job: Job) -> None:  # noqa: F811
    gpu = {"ACCELERATE_USE_CPU": ""}  # the daemon's GPU env has no ACCELERATE_USE_CPU
    res = job.run(job.argv(), KOHYA_DOUBLE_OOM_ABOVE_BATCH="1", **gpu)
    assert res.returncode == 1
    assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 320.00 MiB." in res.stderr
    assert "Traceback (most recent call last):" in res.stderr and "model saved." not in res.stdout
    failure = classify(res, cpu=False)
    assert (failure.kind, failure.message) == ("out_of_memory", "The graphics card ran out of memory.")
    assert job.run(job.argv(), KOHYA_DOUBLE_OOM_ABOVE_BATCH="2", **gpu).returncode == 0  # batch 2 fits


def test_the_double_needs_checkpointing_when_told_and_can_run_out_later(job: Job) -> None:  # noqa: F811
    res = job.run(job.argv(), KOHYA_DOUBLE_OOM_WITHOUT_CHECKPOINTING="1", KOHYA_DOUBLE_OOM_AT_STEP="5")
    assert res.returncode == 1
    # a CPU run (ACCELERATE_USE_CPU) runs out of RAM, as torch's CPU allocator says it
    assert "DefaultCPUAllocator: not enough memory: you tried to allocate" in res.stderr
    assert "saving checkpoint:" in res.stdout  # epoch 1 (4 steps) was saved before step 5 ran out
    failure = classify(res, cpu=True)
    assert (failure.kind, failure.message) == ("out_of_memory", "The computer ran out of memory (RAM) during training.")
    with_checkpointing = [*job.argv(), "--gradient_checkpointing"]
    assert job.run(with_checkpointing, KOHYA_DOUBLE_OOM_WITHOUT_CHECKPOINTING="1").returncode == 0
