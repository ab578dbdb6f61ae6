"""train/checkpointing.CheckpointStore on its own: what a run that ends before its first save leaves."""

import os

from train.checkpointing import CHECKPOINT_SUBDIR, CheckpointStore


def test_closing_before_any_save_finishes_removing_a_killed_runs_temporary_steps(tmp_path):
    """A killed run leaves `<step>.orbax-checkpoint-tmp*` directories; the next start removes them in a
    background thread. A run that stops at once (a user error) must still finish that removal before close()
    returns: a thread left running at interpreter exit fails there with a traceback."""
    directory = tmp_path / CHECKPOINT_SUBDIR
    leftovers = [directory / f"{step}.orbax-checkpoint-tmp-{1700000000 + step}" for step in range(40)]
    for path in leftovers:
        (path / "params").mkdir(parents=True)
        (path / "params" / "data").write_bytes(b"\0" * 1024)
    store = CheckpointStore(str(tmp_path), keep=2)
    store.close()
    assert [p.name for p in leftovers if p.exists()] == []
    assert store.latest_step() is None
    assert os.listdir(directory) == []
