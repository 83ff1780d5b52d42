"""The kohya double's state saving and `--resume`, held against the real sd-scripts runs recorded in
tests/fixtures/kohya_resume/ (FACTS.md, runs a-h): the same folders, files, train_state.json values, bar, epochs
and ss_steps, run with the daemon's own argv. If the double drifts from these, the resume tests prove nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
from pathlib import Path

from safetensors import safe_open

from daemon.pipeline.params import total_steps
from tests.test_kohya_double import IMAGES, TINY, Job
from tests.test_kohya_double import job as job  # a fixture: pytest finds it by name

FIXTURES = Path(__file__).parent / "fixtures" / "kohya_resume"
REAL_NAME = "r1lora"
NAME = "Test_Hero"
# the recorded runs: 4 steps per epoch, 3 epochs, a state every epoch, only the newest kept
PARAMS = dataclasses.replace(TINY, epochs=3)


@dataclasses.dataclass
class Listing:
    """What `ls -laR` + `du -sh` + train_state.json of a real run's output folder showed (X_outputs_*.txt)."""

    entries: list[str]
    state_files: set[str]
    train_states: dict[str, dict[str, int]]


def real(file: str) -> Listing:
    text = (FIXTURES / file).read_text(encoding="utf-8")
    entries = sorted(m.group(1).replace(REAL_NAME, NAME) for m in re.finditer(r"^[\d.]+[KMG]?\t(\S+)$", text, re.M))
    files = set(re.findall(r"^-\S+ .* (\S+\.(?:safetensors|bin|pkl|json))$", text.split("-state:", 1)[1], re.M)) \
        if "-state:" in text else set()
    states = {m.group(1).replace(REAL_NAME, NAME): json.loads(m.group(2))
              for m in re.finditer(r"^(\S+)/train_state\.json: (\{.*\})$", text, re.M)}
    return Listing(entries, files, states)


def listing(out: Path) -> Listing:
    states = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*-state/train_state.json")}
    files = {f.name for folder in out.glob("*-state") for f in folder.iterdir()}
    return Listing(sorted(p.name for p in out.iterdir()), files, states)


def ss(path: Path, key: str) -> str:
    with safe_open(str(path), framework="numpy") as fh:
        return str(fh.metadata()[key])


def real_ss(file: str, key: str) -> str:
    match = re.search(rf"^\s+{key} = (\S+)$", (FIXTURES / file).read_text(encoding="utf-8"), re.M)
    assert match is not None
    return match.group(1)


def resume_argv(job: Job, folder: Path, epochs_done: int) -> list[str]:
    return job.argv(PARAMS, resume_state=str(folder), initial_epoch=epochs_done + 1)


def kill_after_first_state(job: Job) -> None:
    """Run b: SIGKILL to the process group as soon as `epoch 2/3` is printed (the epoch-1 state is written)."""
    proc = subprocess.Popen(job.argv(PARAMS), cwd=job.root / "workspace", env=job.env(KOHYA_DOUBLE_STEP_SECONDS="0.02"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    for raw in proc.stdout:
        if raw.decode().strip() == "epoch 2/3":
            os.killpg(proc.pid, signal.SIGKILL)
            break
    assert proc.wait(30) == -signal.SIGKILL


def test_states_are_saved_pruned_and_finished_as_in_the_real_run(job: Job) -> None:
    assert total_steps(PARAMS, IMAGES) == 12  # as the recorded runs: 4 per epoch
    res = job.run(job.argv(PARAMS))
    assert res.returncode == 0, res.stderr
    assert listing(job.out) == real("a_outputs_final.txt")
    assert real("a_outputs_final.txt").state_files == {"model.safetensors", "optimizer.bin", "scheduler.bin",
                                                       "random_states_0.pkl", "train_state.json"}
    assert f"removing old state: {job.out / f'{NAME}-000001-state'}" in res.stdout
    assert res.stdout.index("saving last state.") < res.stdout.index(f"saving checkpoint: {job.out / NAME}.safetensors")
    for stem in ("000001", "000002", None):
        file = f"{NAME}-{stem}.safetensors" if stem else f"{NAME}.safetensors"
        assert ss(job.out / file, "ss_steps") == real_ss(f"a_inspect_{file.replace(NAME, REAL_NAME)[:-12]}.txt",
                                                         "ss_steps")


def test_a_kill_after_the_first_epoch_leaves_what_the_real_run_left(job: Job) -> None:
    kill_after_first_state(job)
    assert listing(job.out).entries == real("b_outputs_after_kill.txt").entries
    assert {f.name for f in (job.out / f"{NAME}-000001-state").iterdir()} == real("c_outputs_final.txt").state_files


def test_resume_goes_on_from_the_next_epoch_with_a_relative_bar_and_ss_steps(job: Job) -> None:
    kill_after_first_state(job)
    res = job.run(resume_argv(job, job.out / f"{NAME}-000001-state", 1))
    assert res.returncode == 0, res.stderr
    # run c (and h, with the same --initial_epoch 2): epochs 2 and 3 only, the bar 0/12 .. 8/12, never 12/12
    assert "epoch 1/3" not in res.stdout and res.stdout.index("epoch 2/3") < res.stdout.index("epoch 3/3")
    real_bar = (FIXTURES / "run-c" / "stderr.log").read_text(encoding="utf-8")
    for shown in ("| 0/12 [", "| 8/12 ["):
        assert shown in real_bar and shown in res.stderr
    assert "12/12" not in real_bar and "12/12" not in res.stderr
    assert "steps from the state is ignored because initial_step is specified" in res.stdout
    assert listing(job.out) == real("c_outputs_final.txt")  # train_state.json counts the launch's steps: {2,4} {3,8}
    assert ss(job.out / f"{NAME}-000002.safetensors", "ss_steps") == real_ss("c_inspect_r1lora-000002.txt", "ss_steps")
    assert ss(job.out / f"{NAME}.safetensors", "ss_steps") == real_ss("c_inspect_r1lora.txt", "ss_steps") == "8"
    assert ss(job.out / f"{NAME}.safetensors", "ss_epoch") == real_ss("c_inspect_r1lora.txt", "ss_epoch") == "3"


def test_a_second_resume_needs_initial_epoch_as_in_runs_f_and_g(job: Job) -> None:
    kill_after_first_state(job)
    assert job.run(resume_argv(job, job.out / f"{NAME}-000001-state", 1)).returncode == 0
    chained = job.out / f"{NAME}-000002-state"  # written by a resumed launch: {"current_step": 4}
    copy = job.root / "f"
    subprocess.run(["cp", "-a", str(job.out), str(copy)], check=True)
    # run f: the plain --resume computes epoch 4 // 4 = 1 and trains epoch 2 again
    plain = [*job.argv(PARAMS, output_dir=str(copy)), "--resume", str(copy / chained.name)]
    res = job.run(plain)
    assert res.returncode == 0 and "epoch 2/3" in res.stdout and "| 8/12 [" in res.stderr
    assert listing(copy).train_states == real("f_outputs_final.txt").train_states
    # run g: with --initial_epoch 3 only epoch 3 runs (bar to 4/12), ss_steps 4
    res = job.run(resume_argv(job, chained, 2))
    assert res.returncode == 0, res.stderr
    assert "epoch 2/3" not in res.stdout and "epoch 3/3" in res.stdout
    assert "| 4/12 [" in res.stderr and "| 5/12 [" not in res.stderr
    assert listing(job.out).train_states[f"{NAME}-state"] == real("g_outputs_final.txt").train_states[f"{NAME}-state"]
    assert ss(job.out / f"{NAME}.safetensors", "ss_steps") == real_ss("g_inspect_r1lora.txt", "ss_steps") == "4"


def test_resuming_the_final_state_fails_as_kohya_does(job: Job) -> None:
    assert job.run(job.argv(PARAMS)).returncode == 0
    res = job.run([*job.argv(PARAMS), "--resume", str(job.out / f"{NAME}-state")])
    real_last = (FIXTURES / "run-e" / "stderr.log").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert (FIXTURES / "run-e" / "exit_code").read_text().strip() == "1" and res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == real_last  # AssertionError ...: 12 vs 12


def test_a_missing_or_cut_short_state_fails_like_accelerate(job: Job) -> None:
    job.out.mkdir()
    gone = job.out / f"{NAME}-000001-state"
    res = job.run(resume_argv(job, gone, 1))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == f"ValueError: Tried to find {gone} but folder does not exist"
    gone.mkdir()
    (gone / "train_state.json").write_text('{"current_epoch": 1, "current_step": 4}')
    (gone / "model.safetensors").write_bytes(b"\0")  # killed while accelerate saved the optimizer
    res = job.run(resume_argv(job, gone, 1))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("FileNotFoundError: [Errno 2] No such file or directory:")


def test_a_kill_while_a_state_is_written_leaves_it_without_its_last_file(job: Job) -> None:
    proc = subprocess.Popen(job.argv(PARAMS), cwd=job.root / "workspace",
                            env=job.env(KOHYA_DOUBLE_STATE_SECONDS="30"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    for raw in proc.stdout:
        if raw.decode().startswith("saving state at epoch 1"):
            break
    folder = job.out / f"{NAME}-000001-state"
    for _ in range(200):
        if (folder / "scheduler.bin").is_file():
            break
        subprocess.run(["sleep", "0.02"], check=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.bin", "scheduler.bin",
                                                         "train_state.json"]
