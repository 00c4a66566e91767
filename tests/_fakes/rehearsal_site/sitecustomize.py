"""Loaded by every process of the multi-host rehearsal (PYTHONPATH): the fake bucket, and a
SIGKILL of one process right after a given step's checkpoint (a host lost mid-run)."""
import os

if os.environ.get("BALCAP_FAKE_BUCKET_ROOT"):
    from tests._fakes import bucket
    bucket.install(os.environ["BALCAP_FAKE_BUCKET_ROOT"])

if os.environ.get("BALCAP_KILL_AT_STEP") and \
        os.environ.get("BALCAP_KILL_PROCESS") == os.environ.get("BALCAP_PROCESS_ID"):
    import signal

    from balcap_jax import checkpoint

    _save = checkpoint.Checkpointer.save

    def save(self, step, *args, **kwargs):
        saved = _save(self, step, *args, **kwargs)
        if saved and step == int(os.environ["BALCAP_KILL_AT_STEP"]):
            print(f"[rehearsal] process killed after step {step}'s checkpoint", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return saved
    checkpoint.Checkpointer.save = save
