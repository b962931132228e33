"""The slurm/ scripts and the trainer's preemption handling on a real Slurm cluster (tests/helpers/slurm_cluster.py):
an array job over two demo trainings, requeue and real preemption resuming to identical weights, cancellation
staying cancelled, a Hydra multirun through submitit (one element requeued through submitit), two-node DDP and FSDP2
jobs requeued and resumed side by side, a slow checkpoint write on rank 0 finishing before the job requeues; a killed
task requeueing the job (to identical weights) up to MAX_FAILURES times, a run that failed by itself not requeued."""

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers.runs import DEMO, ONE_STEP, ROOT, assert_same_run, faults, final_state, torchrun
from helpers.slurm_cluster import LocalSlurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # on one xdist worker: tests/conftest.py ONE_WORKER

QUIET = ["progress=false", "logger.mode=disabled", "log_every=1"]
# The test nodes have 2 CPUs and 2 fake GPUs each: one task with both CPUs per node.
ONE_TASK = ["--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=2"]


@pytest.fixture(scope="module")
def cluster():
    # not pytest's tmp: munged refuses 0700 parents; four nodes: two 2-node jobs side by side
    c = LocalSlurm(Path(tempfile.mkdtemp(prefix="mvslurm-")), nodes=("n1", "n2", "n3", "n4"))
    try:
        yield c.start()
    finally:
        pids = c.pids()
        c.stop()
        left = [p for p in pids if Path(f"/proc/{p}").exists()]
        assert not left, f"Slurm/munge processes left running: {left}"


@pytest.fixture
def job_env(cluster, env):
    """What a user's shell has when submitting: the project's python first on PATH, the cluster's config."""
    return {**env, **cluster.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def wait_for_glob(folder: Path, pattern: str, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(folder.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.3)
    raise TimeoutError(f"no {pattern} in {folder} after {timeout} s")


def wait_for(path: Path, pattern: str, timeout: float = 180, count: int = 1) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = path.read_text() if path.exists() else ""
        if len(re.findall(pattern, text, re.M)) >= count:
            return text
        time.sleep(0.3)
    raise TimeoutError(f"{pattern!r} x{count} not in {path} after {timeout} s:\n{text[-3000:]}")


@contextlib.contextmanager
def alongside(cmd: list, log: Path, env: dict):
    """``cmd`` (the uninterrupted reference run) in the background while the block drives the cluster, whose jobs
    spend much of their time waiting for Slurm; its output goes to ``log``. It must have succeeded when the block
    ends, and is killed if the block fails."""
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        yield
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()


def test_every_task_gets_the_cpus_of_its_allocation(cluster, job_env, tmp_path):
    """launch.sh passes --cpus-per-task to srun (Slurm 22.05's release notes have srun stop reading it from sbatch),
    and the cluster binds tasks to cores (TaskPlugin=task/affinity): each task runs on its own cpus-per-task CPUs.
    The training process's thread count defaults to 1 on GPU tasks (the cores are the loader's), else to its CPUs."""
    code = ("import os; print('task', os.environ['SLURM_PROCID'], sorted(os.sched_getaffinity(0)), "
            "os.environ['OMP_NUM_THREADS'])")
    env = {k: v for k, v in job_env.items() if k != "OMP_NUM_THREADS"}
    jobs = {"two": cluster.sbatch("-w", "n1", "--ntasks=2", "--cpus-per-task=1", f"--output={tmp_path}/two.out",
                                  ROOT / "slurm/launch.sh", "-c", code, env=env),
            "gpu": cluster.sbatch("-w", "n2", *ONE_TASK, f"--output={tmp_path}/gpu.out", ROOT / "slurm/launch.sh",
                                  "-c", code, env=env)}
    for name, jid in jobs.items():
        assert cluster.wait(jid, 120)[0]["JobState"] == "COMPLETED", (tmp_path / f"{name}.out").read_text()
    tasks = lambda name: sorted(re.findall(r"^task (\d) (\[.*\]) (\d+)$", (tmp_path / f"{name}.out").read_text(), re.M))
    two = tasks("two")
    assert [(rank, len(json.loads(cpus)), omp) for rank, cpus, omp in two] == [("0", 1, "1"), ("1", 1, "1")]
    assert json.loads(two[0][1]) != json.loads(two[1][1])  # each on a core of its own
    assert [(rank, len(json.loads(cpus)), omp) for rank, cpus, omp in tasks("gpu")] == [("0", 2, "1")]


def test_paper_table_array_job_trains_and_evaluates_two_seeds_of_the_demo(cluster, job_env, tmp_path):
    """paper_table.sbatch with SEEDS: one array element per (experiment, seed), each checked first (dry runs), trained,
    evaluated into one table; the report has the seeds' mean and spread."""
    table = tmp_path / "table"
    jid = cluster.sbatch("--array=0-1", *ONE_TASK, f"--output={tmp_path}/%A_%a.out", ROOT / "slurm/paper_table.sbatch",
                         "epochs=1", "data.kind=folder", *QUIET,
                         env={**faults(job_env, HOLD_AT_STEPS=5, ONLY_WHERE="SLURM_ARRAY_TASK_ID=0"),
                              "EXPERIMENTS": "demo", "SEEDS": "31 32", "TABLE_DIR": str(table),
                              "EVAL_ARGS": "data=digits data.kind=folder model.img_size=32 progress=false"})
    # Element 0 hears its time limit coming mid-run: it checkpoints and requeues itself (its own job id).
    log0 = wait_for_glob(tmp_path, "*_0.out")
    wait_for(log0, r"^fault: holding at global step 5 ")
    cluster.out(["scancel", "--signal=USR1", f"{jid}_0"])
    jobs = cluster.wait(jid, 400)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert [j["JobState"] for j in jobs] == ["COMPLETED"] * 2, logs[-3000:]
    assert sorted(j["ArrayTaskId"] for j in jobs) == ["0", "1"]
    assert {j["ArrayTaskId"]: j["Restarts"] for j in jobs} == {"0": "1", "1": "0"}
    text0 = log0.read_text()
    assert "stopped by SIGUSR1 after checkpointing (requeued job" in text0 and "resumed from" in text0, text0[-3000:]
    assert len({j["NodeList"] for j in jobs}) == 2  # one element per node, side by side
    rows = [r for r in (table / "table.md").read_text().splitlines() if r.startswith("| mambavision_demo |")]
    assert len(rows) == 2
    for i in range(2):
        summary = final_state(table / f"{i}-demo-seed{31 + i}")
        assert summary["state"]["epoch"] == 1 and summary["state"]["best_top1"] > 10.0
        assert f"{i}-demo-seed{31 + i}/checkpoints/ema_best.pth" in "".join(rows)
        assert f"seed: {31 + i}" in (table / f"{i}-demo-seed{31 + i}" / "config.yaml").read_text()
    assert text0.count("ok: train.py would train mambavision_demo") == 1  # checked once, not again after the requeue
    assert "ok: eval.py would evaluate mambavision_demo" in text0
    report = (table / "report" / "report.md").read_text()  # each element rewrote it after its eval
    assert "| mambavision_demo |" in report and (table / "report" / "reproduction.png").is_file()
    assert re.search(r"^\| mambavision_demo \| demo \| 2 \| \d+\.\d\d ± \d+\.\d\d \|", report, re.M), report


def test_the_paper_table_checks_its_evaluation_data_before_training(cluster, job_env, tmp_path):
    """Submitted without IMAGENET_ROOT (or with a wrong one), an element stops at once with one line, before hours of
    training; its log goes where the job was submitted from, from any folder."""
    jid = cluster.sbatch("--array=0", *ONE_TASK, ROOT / "slurm/paper_table.sbatch", "data.kind=folder", *QUIET,
                         env={**job_env, "EXPERIMENTS": "demo", "TABLE_DIR": str(tmp_path / "table"),
                              "MV_ROOT": str(ROOT), "EVAL_ARGS": "data.root=/no/imagenet"}, cwd=tmp_path)
    [job] = cluster.wait(jid, 120)
    [log] = tmp_path.glob("slurm-mambavision-table-*_0.out")
    errors = [ln for ln in log.read_text().splitlines() if ln.startswith("error:")]
    assert job["JobState"] == "FAILED" and errors == [
        "error: /no/imagenet/val not found: data.root must hold val/<class>/<image> folders; extract ImageNet's "
        "archives with `python -m mambavision_train.data.imagenet_prep --archives DIR --out /path/to/imagenet` "
        "(docs/data.md)"], log.read_text()[-2000:]
    assert not (tmp_path / "table" / "0-demo").exists()  # nothing trained


def test_the_smoke_job_trains_and_evaluates_the_demo_with_the_sites_environment(cluster, job_env, tmp_path):
    """slurm/smoke.sbatch on one node, two tasks (DDP), after the site's environment hook (MV_ENV_SETUP)."""
    hook = tmp_path / "mv_env.sh"
    hook.write_text('echo "environment hook: module load would go here"\nexport MV_HOOK_RAN=yes\n')
    jid = cluster.sbatch("--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", ROOT / "slurm/smoke.sbatch",
                         "max_steps=3", env={**job_env, "MV_ENV_SETUP": str(hook), "MV_ROOT": str(ROOT),
                                             "MAMBAVISION_RUNS": str(tmp_path / "runs")}, cwd=tmp_path)
    [job] = cluster.wait(jid, 300)
    [log] = tmp_path.glob("slurm-mambavision-smoke-*.out")
    text = log.read_text()
    assert job["JobState"] == "COMPLETED", text[-3000:]
    assert text.index("environment hook: module load would go here") < text.index("ok: train.py would train")
    assert "2 tasks x 1 CPUs" in text and re.search(r"^eval mambavision_demo top1 \S+ ", text, re.M), text[-2000:]
    assert final_state(tmp_path / "runs" / f"smoke-{jid}")["world_size"] == 2


def test_requeue_and_preemption_resume_to_identical_weights(cluster, job_env, tmp_path):
    """scontrol requeue (SIGTERM: checkpoint, Slurm requeues) then a real preemption by the urgent partition (USR1
    through preempt_send_user_signal: checkpoint, the run requeues itself), then on across the end of epoch 0 and its
    validation: the run ends where an uninterrupted one does, bit for bit. Meanwhile on the other node a cancelled run
    checkpoints and stays cancelled."""
    train = [*DEMO, "max_steps=24", *QUIET]
    out, cancelled_out = tmp_path / "slurm.out", tmp_path / "cancelled.out"
    with alongside([sys.executable, ROOT / "train.py", *train, f"run_dir={tmp_path / 'whole'}"],
                   tmp_path / "whole.out", job_env):
        jid = cluster.sbatch("-w", "n1", *ONE_TASK, f"--output={out}", ROOT / "slurm/train.sbatch", *train,
                             f"run_dir={tmp_path / 'slurm'}", env=faults(job_env, HOLD_AT_STEPS="5,8"))
        cid = cluster.sbatch("-w", "n2", *ONE_TASK, f"--output={cancelled_out}", ROOT / "slurm/train.sbatch", *train,
                             f"run_dir={tmp_path / 'cancelled'}", env=faults(job_env, HOLD_AT_STEPS=3))
        wait_for(out, r"^fault: holding at global step 5 ")
        cluster.out(["scontrol", "requeue", jid])
        wait_for(cancelled_out, r"^fault: holding at global step 3 ")
        cluster.out(["scancel", cid])
        # Preempted once the requeued run trains again (at step 8, its signal handlers in place).
        wait_for(out, r"^fault: holding at global step 8 ")
        urgent = cluster.sbatch("-p", "urgent", "-w", "n1", "-c", "2", f"--output={tmp_path / 'urgent.out'}",
                                "--wrap", "sleep 1", env=job_env)
        [job] = cluster.wait(jid, 300)
        text = out.read_text()
        assert job["JobState"] == "COMPLETED" and job["Restarts"] == "2", text[-3000:]
        assert cluster.jobs(urgent)[0]["JobState"] == "COMPLETED"
        assert "stopped by SIGTERM after checkpointing (not requeued)" in text
        assert re.search(rf"stopped by SIGUSR1 after checkpointing \(requeued job {jid}\)", text), text[-3000:]
        # Held after steps 5 and 8: the signal reaches every rank in the next step's verdict.
        assert re.findall(r"^resumed from .*global step (\d+)$", text, re.M) == ["6", "9"], text[-3000:]
        assert "val epoch 0" in text

        [c] = cluster.wait(cid, 60)
        time.sleep(3)
        [c] = cluster.jobs(cid)
        ctext = cancelled_out.read_text()
        assert c["JobState"] == "CANCELLED" and c["Restarts"] == "0", ctext[-2000:]
        assert "stopped by SIGTERM after checkpointing (not requeued)" in ctext
        # scancel's SIGTERM reaches launch.sh and its tee too: they outlive the ranks' last lines
        assert "[launch] stopped by SIGTERM (task 0 exit 143): not requeued" in ctext, ctext[-2000:]
        assert final_state(tmp_path / "cancelled")["state"]["global_step"] == 4
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "slurm")
    assert a["state"]["global_step"] == b["state"]["global_step"] == 24
    assert_same_run(a, b)


def test_hydra_multirun_through_submitit_is_an_array_and_resumes_after_requeue(cluster, job_env, tmp_path):
    """python train.py -m hydra/launcher=slurm ...: two elements; element 0 gets submitit's USR2 mid-run (what it
    gets before the time limit): the trainer checkpoints, submitit requeues it, it resumes; both finish."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", *DEMO, "run_name=a,b",
           f"run_dir={tmp_path}/" + "${run_name}", "max_steps=10", *QUIET, "hydra.launcher.partition=debug",
           "hydra.launcher.gpus_per_node=1", "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=2",
           f"hydra.sweep.dir={sweep}"]
    parent = subprocess.Popen(cmd, cwd=ROOT, env=faults(job_env, HOLD_AT_STEPS=5, ONLY_WHERE="SLURM_ARRAY_TASK_ID=0"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log0 = wait_for_glob(sweep, ".submitit/*_0/*_0_0_log.out", 180)
        wait_for(log0, r"^fault: holding at global step 5 ")
        cluster.out(["scancel", "--signal=USR2", log0.parent.name])
        output, _ = parent.communicate(timeout=300)
    finally:
        parent.kill()
    assert parent.returncode == 0, output[-3000:]
    text = log0.read_text()
    assert "Requeued job" in text and "resumed from" in text, text[-3000:]
    submission = next(sweep.glob(".submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-1" in submission and "#SBATCH --requeue" in submission
    for name in ("a", "b"):
        assert final_state(tmp_path / name)["state"]["global_step"] == 10


def test_two_node_ddp_and_fsdp_survive_a_requeue_with_a_slow_save_on_rank_0(cluster, job_env, tmp_path):
    """train_multinode.sbatch over two emulated nodes each (srun -N2, gloo, MASTER_ADDR from the first node's
    NodeAddr), side by side: DDP with SyncBN on n1-n2, FSDP2 on n3-n4 (each rank writes its shards, rank 0 the rest),
    rank 0 taking 5 s to write every checkpoint (a big model on a shared filesystem). USR1 reaches both ranks after
    step 2, they stop after step 3, rank 1 waits until rank 0 has written and requeued (a rank that exited first would
    make srun kill rank 0 halfway through the write), both nodes resume at step 3 and complete; the DDP weights after
    4 steps equal those of 2 processes run uninterrupted by torchrun, alongside. (That DDP equals one process at the
    global batch is tests/test_distributed.py's.)"""
    steps = [*ONE_STEP, "batch_size=32", "micro_batch_size=16", "max_steps=4", "log_every=1"]
    nodes = {"ddp": "n[1-2]", "fsdp": "n[3-4]"}
    kind_args = {"ddp": ["dist.sync_bn=true"], "fsdp": ["dist=fsdp"]}
    with alongside([*torchrun(2), ROOT / "train.py", *steps, *kind_args["ddp"], f"run_dir={tmp_path / 'torchrun'}"],
                   tmp_path / "torchrun.out", job_env):
        jobs = {kind: cluster.sbatch("--nodes=2", "-w", nodes[kind], *ONE_TASK, f"--output={tmp_path / kind}.out",
                                     ROOT / "slurm/train_multinode.sbatch", *steps, *kind_args[kind],
                                     f"run_dir={tmp_path / kind}", env=faults(job_env, SLOW_SAVE=5, HOLD_AT_STEPS=2))
                for kind in nodes}
        for kind, jid in jobs.items():
            wait_for(tmp_path / f"{kind}.out", r"^fault: holding at global step 2 ", count=2)
            cluster.out(["scancel", "--signal=USR1", jid])
        for kind, jid in jobs.items():
            [job] = cluster.wait(jid, 400)
            text = (tmp_path / f"{kind}.out").read_text()
            assert job["JobState"] == "COMPLETED" and job["NodeList"] == nodes[kind], (kind, text[-3000:])
            assert job["Restarts"] == "1" and text.count("received SIGUSR1") == 2, (kind, text[-3000:])
            assert "fault: saving slowly (5 s)" in text, (kind, text[-3000:])
            assert re.findall(r"^resumed from .*global step (\d+)$", text, re.M) == ["3"], (kind, text[-3000:])
            assert final_state(tmp_path / kind)["state"]["global_step"] == 4
    a, b = final_state(tmp_path / "torchrun"), final_state(tmp_path / "ddp")
    assert a["world_size"] == b["world_size"] == 2 and a["state"]["global_step"] == b["state"]["global_step"] == 4
    assert_same_run(a, b)


def test_a_killed_task_requeues_the_job_which_resumes_bit_exactly(cluster, job_env, tmp_path, paper_2ranks):
    """Two nodes, one task each, the paper augmentation and MESA: rank 1 is SIGKILLed after step 5 on the job's first
    start; srun kills rank 0, launch.sh counts the failure in the job's Comment and requeues the job; the second
    start resumes from the epoch-0 checkpoint (step 4) and ends equal to an uninterrupted torchrun run, bit for bit."""
    (args, whole), out = paper_2ranks, tmp_path / "slurm.out"
    jid = cluster.sbatch("--nodes=2", *ONE_TASK, f"--output={out}", ROOT / "slurm/train_multinode.sbatch", *args,
                         f"run_dir={tmp_path / 'run'}",
                         env=faults(job_env, KILL_RANK="1:5", ONLY_WHERE="SLURM_RESTART_COUNT="))
    [job] = cluster.wait(jid, 600)
    text = out.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text[-3000:]
    assert job["Comment"] == "rank_failures=1"
    assert text.count("fault: rank 1 killing itself after global step 5") == 1
    assert re.findall(r"^\[launch\] .*$", text, re.M) == [
        "[launch] task 1 failed (exit 137): requeued, failure 1 of 3 (the job resumes from the last checkpoint)",
        "[launch] done (exit 0)"], text[-3000:]
    assert re.findall(r"^resumed from .*global step (\d+)$", text, re.M) == ["4"], text[-3000:]
    a, b = final_state(whole), final_state(tmp_path / "run")
    assert a["state"]["global_step"] == b["state"]["global_step"] == 8
    assert_same_run(a, b)


def test_a_run_that_fails_by_itself_is_not_requeued_and_rank_failures_stop_at_max_failures(cluster, job_env,
                                                                                          tmp_path):
    """Side by side on the two nodes: a NaN loss with nan_policy=stop (exit 2) ends the job at once, not requeued;
    a task killed on every start with MAX_FAILURES=1 is requeued once, then the job stops with one line."""
    train = [*DEMO, *QUIET, "batch_size=32", "micro_batch_size=32", "max_steps=3"]
    nan_out, kill_out = tmp_path / "nan.out", tmp_path / "kill.out"
    nan = cluster.sbatch("-w", "n1", *ONE_TASK, f"--output={nan_out}", ROOT / "slurm/train.sbatch", *train,
                         "nan_policy=stop", f"run_dir={tmp_path / 'nan'}", env=faults(job_env, NAN="0:2"))
    kill = cluster.sbatch("-w", "n2", *ONE_TASK, f"--output={kill_out}", ROOT / "slurm/train.sbatch", *train,
                          f"run_dir={tmp_path / 'kill'}", env={**faults(job_env, KILL_RANK="0:1"), "MAX_FAILURES": "1"})
    [n] = cluster.wait(nan, 300)
    text = nan_out.read_text()
    assert n["JobState"] == "FAILED" and n["Restarts"] == "0" and n["ExitCode"] == "2:0", text[-3000:]
    assert re.findall(r"^\[launch\] .*$", text, re.M) == [
        "[launch] the run failed by itself (task 0 exit 2): not requeued; fix what the error line above names, then "
        "submit the same command again (it resumes from the last checkpoint)"], text[-3000:]
    assert re.search(r"^error: non-finite loss .* at epoch 0, step 1 \(global step 2\)", text, re.M), text[-3000:]
    [k] = cluster.wait(kill, 300)
    text = kill_out.read_text()
    assert k["JobState"] == "FAILED" and k["Restarts"] == "1" and k["Comment"] == "rank_failures=1", text[-3000:]
    assert text.count("fault: rank 0 killing itself after global step 1") == 2
    assert re.findall(r"^\[launch\] .*$", text, re.M) == [
        "[launch] task 0 failed (exit 137): requeued, failure 1 of 1 (the job resumes from the last checkpoint)",
        "[launch] task 0 failed (exit 137): failure 2 with MAX_FAILURES=1: not requeued; the first error above says "
        "what failed; fix it (or raise MAX_FAILURES) and submit the same command again: it resumes from the last "
        "checkpoint"], text[-3000:]
    assert k["ExitCode"] == "137:0"
