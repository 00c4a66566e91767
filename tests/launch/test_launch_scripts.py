"""launch/tpu_pod.sh, launch/slurm_gpu.sh and launch/local_multiprocess.sh.

The cluster scripts are checked through --dry-run (each command printed after "+ ", quoted as
bash would read it: shlex parses it back), and the commands they send to the workers are run
here where that is possible without the cluster (the TPU `run` command, against a fake
interpreter). local_multiprocess.sh runs for real in tests/train/test_multihost.py: two
processes of two fake CPU devices each take one step of configs/tiny.py on one 4-device mesh.
"""
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TPU, SLURM, LOCAL = (os.path.join(ROOT, "launch", n)
                     for n in ("tpu_pod.sh", "slurm_gpu.sh", "local_multiprocess.sh"))
LIBTPU = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


def _env(**extra) -> dict:
    """This environment without SLURM's variables (a test run inside a job must not see it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("BALCAP_PYTHON", None)
    return {**env, **extra}


def _run(script, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
    """The script in a session of its own: past the timeout, all it started is killed too."""
    p = subprocess.Popen(["bash", script, *args], cwd=ROOT, env=env or _env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{script} {args} ran past {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _commands(out: str, prefix: str = "+ ") -> list[list[str]]:
    """The printed commands (lines starting with prefix) as argument lists."""
    return [shlex.split(line[len(prefix):]) for line in out.splitlines()
            if line.startswith(prefix)]


def _shell_words(command: str) -> list[str]:
    """The words of a bash command line, with ; && || | & < > ( ) as words of their own."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def _jax_pin() -> str:
    with open(os.path.join(ROOT, "launch", "constraints.txt")) as f:
        pins = [line.split("==")[1].strip() for line in f if line.startswith("jax==")]
    assert len(pins) == 1
    return pins[0]


def test_scripts_are_executable_and_document_themselves():
    for script in (TPU, SLURM, LOCAL):
        assert os.access(script, os.X_OK), script
        r = _run(script, "--help")
        assert r.returncode == 0, r.stderr
        assert "--dry-run" in r.stdout and "balcap_jax.main" in r.stdout, script


# ---------------------------------------------------------------------------------------------
# TPU pod (a v4-32 is 16 chips on 4 hosts: every command goes to all workers)

POD = ("--name", "pod-a", "--zone", "us-central2-b", "--type", "v4-32")


def _tpu(sub, *args) -> list[str]:
    r = _run(TPU, sub, *POD, "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    assert len(cmds) == 1, r.stdout
    return cmds[0]


def _remote(argv) -> str:
    commands = [a for a in argv if a.startswith("--command=")]
    assert len(commands) == 1, argv
    command = commands[0][len("--command="):]
    syntax = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert syntax.returncode == 0, (command, syntax.stderr)
    return command


def test_tpu_create_install_run_on_a_4_host_pod():
    create = _tpu("create")
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod-a"]
    assert set(create[6:]) == {"--zone=us-central2-b", "--accelerator-type=v4-32",
                               "--version=tpu-ubuntu2204-base"}
    assert "--spot" in _tpu("create", "--spot", "--version", "my-runtime")
    assert "--version=my-runtime" in _tpu("create", "--version=my-runtime")

    repo, ref = "https://example.com/balcap jax.git", "v1.2"
    install = _tpu("install", "--repo", repo, "--ref", ref)
    assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a"]
    assert "--worker=all" in install and "--zone=us-central2-b" in install
    words = _shell_words(_remote(install))
    text = " ".join(words)
    assert repo in words and f"git clone {repo} balcap_jax" in text
    assert f"git fetch origin {ref}" in text
    assert "git checkout --force --detach FETCH_HEAD" in text
    commands = " ".join(words).split(" ; ")
    assert ".venv/bin/python -m pip install -q -c launch/constraints.txt "  \
        f"jax[tpu]=={_jax_pin()} -f {LIBTPU}" in commands     # the pin of constraints.txt
    assert ".venv/bin/python -m pip install -q -c launch/constraints.txt -e . gcsfs" in commands
    assert "uv venv --seed --python 3.11 .venv" in text
    assert _run(TPU, "install", *POD, "--dry-run").returncode != 0     # --repo is required

    extra = ["--config.workdir=/mnt/shared/run 1", "--config.train.steps=7"]
    run = _tpu("run", "--config", "configs/tiny.py", "--", *extra)
    assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a"]
    assert "--worker=all" in run
    words = _shell_words(_remote(run))
    start = words.index("BALCAP_DISTRIBUTED=1")
    assert words[start:start + 6 + len(extra)] == [
        "BALCAP_DISTRIBUTED=1", "nohup", ".venv/bin/python", "-m", "balcap_jax.main",
        "--config=configs/tiny.py", *extra]
    assert "logs/worker-$(hostname).log" in "".join(words)


def test_tpu_run_command_starts_the_worker_process(tmp_path):
    """The `run` command as a worker's shell gets it, on a fake checkout: the interpreter gets
    the arguments and BALCAP_DISTRIBUTED=1, its output lands in logs/worker-<host>.log, and a
    second `run` while it goes on is refused."""
    home = tmp_path / "home"
    venv = home / "balcap_jax" / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text('#!/bin/sh\necho "argv: $*"\necho "dist: $BALCAP_DISTRIBUTED"\n'
                                 "exec sleep 5\n")
    (venv / "python").chmod(0o755)
    command = _remote(_tpu("run", "--", "--config.workdir=/mnt/a b"))
    first = subprocess.run(["bash", "-c", command], cwd=home, capture_output=True, text=True,
                           timeout=30)
    assert first.returncode == 0 and "started pid" in first.stdout, first
    logs = home / "balcap_jax" / "logs"
    pid = int((logs / "run.pid").read_text())
    try:
        second = subprocess.run(["bash", "-c", command], cwd=home, capture_output=True,
                                text=True, timeout=30)
        assert second.returncode == 1 and "a run is going" in second.stderr, second
        log = logs / f"worker-{os.uname().nodename}.log"
        for _ in range(100):
            if log.exists() and "dist:" in log.read_text():
                break
            time.sleep(0.1)
        assert log.read_text().splitlines() == [
            "argv: -m balcap_jax.main --config=configs/qwen.py --config.workdir=/mnt/a b",
            "dist: 1"]
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_tpu_logs_stop_delete():
    logs = _tpu("logs", "--worker", "3", "--lines", "50")
    assert "--worker=3" in logs and "--worker=all" not in logs
    assert _shell_words(_remote(logs)) == ["tail", "-n", "50", "-F",
                                           "balcap_jax/logs/worker-*.log"]
    stop = _tpu("stop")
    assert "--worker=all" in stop
    words = _shell_words(_remote(stop))
    assert words[:4] == ["pkill", "-TERM", "-f", "[b]alcap_jax[.]main"]
    # the pattern matches the run, not the command line that carries the pattern itself
    assert re.search(words[3], "python -m balcap_jax.main --config=x")
    assert not re.search(words[3], _remote(stop))
    assert _shell_words(_remote(_tpu("stop", "--force")))[1] == "-KILL"
    assert _tpu("delete") == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod-a",
                              "--zone=us-central2-b", "--quiet"]
    bad = _run(TPU, "logs", *POD, "--worker", "all", "--dry-run")
    assert bad.returncode != 0 and "--worker" in bad.stderr


# ---------------------------------------------------------------------------------------------
# SLURM

def _task_env(argv) -> tuple[dict, list[str]]:
    assert argv[0] == "env", argv
    env, i = {}, 1
    while "=" in argv[i] and not argv[i].startswith("-"):
        k, v = argv[i].split("=", 1)
        env[k] = v
        i += 1
    return env, argv[i:]


def test_slurm_submit_dry_run_two_nodes():
    extra = ["--config.workdir=/shared/run a", "--config.train.steps=3"]
    r = _run(SLURM, "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time",
             "02:00:00", "--config", "configs/tiny.py", "--dry-run", "--", *extra)
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    sbatch = [c for c in cmds if c[0] == "sbatch"]
    assert len(sbatch) == 1
    opts = sbatch[0][1:]
    for o in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu",
              "--time=02:00:00"):
        assert o in opts, opts
    wrap = shlex.split([o for o in opts if o.startswith("--wrap=")][0][len("--wrap="):])
    assert wrap[:3] == ["bash", SLURM, "launch"]
    assert wrap[wrap.index("--"):] == ["--", *extra]
    srun = [c for c in cmds if c[0] == "srun"]
    assert len(srun) == 1 and "--ntasks-per-node=1" in srun[0] and "--nodes=2" in srun[0]
    assert srun[0][srun[0].index("task") - 1] == SLURM
    assert "--coordinator" in srun[0] and srun[0][srun[0].index("--coordinator") + 1] == \
        "node0:12355"

    tasks = [line for line in r.stdout.splitlines() if line.startswith("+ [")]
    assert [t.split("]")[0] for t in tasks] == ["+ [node0", "+ [node1"]
    for i, line in enumerate(tasks):
        env, cmd = _task_env(shlex.split(line.split("] ", 1)[1]))
        assert env == {"BALCAP_COORDINATOR": "node0:12355", "BALCAP_NUM_PROCESSES": "2",
                       "BALCAP_PROCESS_ID": str(i), "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}
        assert cmd[1:] == ["-m", "balcap_jax.main", "--config=configs/tiny.py", *extra]


def test_slurm_launch_with_a_node_list_and_a_task():
    r = _run(SLURM, "launch", "--nodes", "2", "--gpus-per-node", "2", "--nodelist",
             "gpu-a17,gpu-b03", "--port", "23456", "--dry-run")
    assert r.returncode == 0, r.stderr
    tasks = [line for line in r.stdout.splitlines() if line.startswith("+ [")]
    assert [t.split("]")[0][3:] for t in tasks] == ["gpu-a17", "gpu-b03"]
    envs = [_task_env(shlex.split(t.split("] ", 1)[1]))[0] for t in tasks]
    assert [e["BALCAP_PROCESS_ID"] for e in envs] == ["0", "1"]
    assert {e["BALCAP_COORDINATOR"] for e in envs} == {"gpu-a17:23456"}
    # launch needs a job (or --dry-run); a task takes its id from srun's variables
    assert _run(SLURM, "launch", "--nodes", "2").returncode != 0
    r = _run(SLURM, "task", "--gpus-per-node", "2", "--coordinator", "gpu-a17:23456",
             "--dry-run", "--", "--config.seed=4",
             env=_env(SLURM_PROCID="1", SLURM_NTASKS="2"))
    assert r.returncode == 0, r.stderr
    (cmd,) = _commands(r.stdout)
    env, rest = _task_env(cmd)
    assert env["BALCAP_PROCESS_ID"] == "1" and env["BALCAP_NUM_PROCESSES"] == "2"
    assert env["BALCAP_COORDINATOR"] == "gpu-a17:23456" and rest[-1] == "--config.seed=4"


# ---------------------------------------------------------------------------------------------
# Local processes

def test_local_dry_run_prints_one_command_per_process():
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_foo=1")
    r = _run(LOCAL, "--processes", "3", "--devices-per-process", "2", "--logdir", "out/l",
             "--dry-run", "--", "--config.workdir=/tmp/a b", env=env)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 3
    coords = set()
    for i, line in enumerate(lines):
        assert line.endswith(f" > out/l/proc{i}.log 2>&1 &"), line
        env, cmd = _task_env(shlex.split(line[2:].rsplit(" > ", 1)[0]))
        assert env["BALCAP_PROCESS_ID"] == str(i) and env["BALCAP_NUM_PROCESSES"] == "3"
        assert env["JAX_PLATFORMS"] == "cpu"
        # the script's device count replaces the caller's, other XLA flags stay
        assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
        coords.add(env["BALCAP_COORDINATOR"])
        assert cmd[1:] == ["-m", "balcap_jax.main", "--config=configs/tiny.py",
                           "--config.workdir=/tmp/a b"]
    assert len(coords) == 1 and re.fullmatch(r"127\.0\.0\.1:\d+", coords.pop())
    assert not os.path.exists(os.path.join(ROOT, "out", "l"))        # nothing started


def test_local_one_failure_stops_the_others(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "process $BALCAP_PROCESS_ID of $BALCAP_NUM_PROCESSES"\n'
                    'if [ "$BALCAP_PROCESS_ID" = 1 ]; then sleep 1; exit 3; fi\n'
                    "exec sleep 120\n")
    fake.chmod(0o755)
    r = _run(LOCAL, "--processes", "3", "--logdir", str(tmp_path / "logs"),
             env=_env(BALCAP_PYTHON=str(fake)), timeout=40)
    assert r.returncode == 1, (r.stdout, r.stderr)
    codes = dict(re.findall(r"process (\d): exit (\d+)", r.stdout))
    assert codes == {"0": "143", "1": "3", "2": "143"}, r.stdout     # SIGTERM: 128 + 15
    assert "process 1 exited with 3" in r.stderr
    assert (tmp_path / "logs" / "proc2.log").read_text() == "process 2 of 3\n"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
