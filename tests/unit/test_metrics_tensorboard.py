"""A resumed run's TensorBoard: the interrupted run's points after the checkpoint disappear, as in metrics.jsonl."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import SessionLog

from megatron_fipo.metrics import MetricsLogger, read_metrics


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: its own reader over every event file of the run."""
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_resume_drops_the_interrupted_steps_from_tensorboard(tmp_path):
    first = MetricsLogger(tmp_path)
    first.truncate_after(-1)  # a fresh run
    for step in range(5):
        first.log(step, {"reward": float(step), **({"eval/acc": 0.5} if step == 4 else {})})
    first.close()

    resumed = MetricsLogger(tmp_path)  # killed after step 4, resumed from the checkpoint of step 2
    resumed.truncate_after(2)
    resumed.log(3, {"reward": 30.0})
    resumed.close()

    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    shown = _scalars(tmp_path)
    assert shown["reward"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    # Step 4's eval point belongs to the interrupted run; no later point of that tag replaced it.
    assert shown.get("eval/acc", []) == []
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"), key=lambda f: int(f.name.rsplit(".", 1)[1]))
    markers = [(e.session_log.status, e.step) for e in EventFileLoader(str(files[-1])).Load() if e.HasField("session_log")]
    assert len(files) == 2 and markers == [(SessionLog.START, 3)]  # the first replayed step
