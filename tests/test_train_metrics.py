"""train/metrics.py: metrics.jsonl and TensorBoard scalars a person can plot, cut back on resume, and
tensorboardX imported without torch (torch is installed here, as on most users' machines)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

from train.metrics import MetricsLogger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scalars(tensorboard_dir: str) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of every event file: TFRecord framing (length, crc, event, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    found = {}
    for name in sorted(os.listdir(tensorboard_dir)):
        with open(os.path.join(tensorboard_dir, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                found[(value.tag, event.step)] = value.simple_value
    return found


def _record(step):
    return {"loss": 10.0 - step, "learning_rate": 1e-3, "grad_norm": 0.5, "tokens_per_second": 100.0}


def test_jsonl_and_tensorboard_hold_every_logged_scalar(tmp_path):
    logger = MetricsLogger(str(tmp_path), total_steps=3, resume_step=None, progress=False)
    for step in (1, 2, 3):
        logger.log(step, {**_record(step), **({"eval_loss": 4.5} if step == 3 else {})})
    logger.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3] and records[2]["eval_loss"] == 4.5
    scalars = _scalars(str(tmp_path / "tensorboard"))
    assert scalars[("train/loss", 2)] == 8.0 and scalars[("eval_loss", 3)] == 4.5
    assert scalars[("train/grad_norm", 1)] == 0.5


def test_resume_cuts_the_records_after_the_restored_step(tmp_path):
    logger = MetricsLogger(str(tmp_path), total_steps=5, resume_step=None, progress=False)
    for step in (1, 2, 3, 4):
        logger.log(step, _record(step))
    logger.close()
    logger = MetricsLogger(str(tmp_path), total_steps=5, resume_step=2, progress=False)
    logger.log(3, _record(3))
    logger.close()
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_tensorboard_is_written_without_importing_torch(tmp_path):
    """A fresh interpreter, as `qwen2-train` starts: the writer works with torch left unimported (1-2 s of
    start-up saved), and a later `import torch` still finds the real package."""
    code = (
        "import sys; from train.metrics import MetricsLogger; "
        f"m = MetricsLogger({str(tmp_path)!r}, total_steps=1, resume_step=None, progress=False); "
        "m.log(1, {'loss': 2.0}); m.close(); "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "import torch; print(torch.__name__, torch.ones(2).sum().item())"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["torch", "2.0"]
    assert _scalars(str(tmp_path / "tensorboard"))[("train/loss", 1)] == 2.0
