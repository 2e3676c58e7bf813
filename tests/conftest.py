import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s, and a worker's report (a checkpoint, an
# evaluation) waits for that poll: the tests' short runs report every few steps, so they poll
# faster. Every Ray process a test starts inherits this environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Ray runs its workers at nice 15, so that anything else on the machine (a benchmark, a second
# suite) takes the CPU before them: a test's trials then start several times slower and can pass
# their time limits. At the default niceness a loaded machine slows them as much as it slows the rest.
os.environ.setdefault("RAY_worker_niceness", "0")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One cache of the embedded corpus, tokenizer and packed sequences for the whole session."""
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def sotu(data_dir):
    from loqt_ray.config import DataConfig
    from loqt_ray.data import prepare

    return prepare(DataConfig(data_dir=data_dir, vocab_size=2048, seq_len=128))


def nano_config(data_dir, *extra):
    """A nano LoQT config on the session's data cache (static merges, a short warmup); `extra`
    are --set overrides, later ones winning."""
    from loqt_ray.config import load_config

    base = [f"data.data_dir={data_dir}", "data.vocab_size=2048", "data.seq_len=64", "model.size=nano",
            "loqt.rank=8", "loqt.schedule=static", "optim.lr=3e-3", "optim.warmup_steps=2",
            "train.eval_tokens=1024"]  # fmt: skip
    return load_config(None, [*base, *extra])


NANO_RUN = [
    "model.size=nano",
    "data.vocab_size=2048",
    "data.seq_len=64",
    "train.micro_batch_size=8",
    "train.eval_tokens=4096",
    "loqt.rank=8",
    "loqt.update_interval=3",
    "loqt.schedule=static",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "scale.cpus_per_worker=1",
]


def train_in_process(cfg):
    """A run directory as `loqt-ray train` leaves it (config, tokenizer, metrics, checkpoint_*),
    trained in this process with the plain engine: no Ray. Returns (run dir, last metrics)."""
    from loqt_ray import checkpoint, rundir
    from loqt_ray.engine import PlainEngine
    from loqt_ray.sink import Collect
    from loqt_ray.trainer import Trainer

    out = rundir.run_dir(cfg)
    trainer = Trainer(cfg, make_engine=PlainEngine)
    rundir.start_run(out, cfg, trainer.data.tokenizer)
    rows = []

    def save(state):
        checkpoint.write(out / f"checkpoint_{state['step']:06d}", state)

    final = trainer.train(Collect(rows, save))
    (out / rundir.METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out, final


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir):
    """One real nano LoQT run, checkpointed at steps 4 and 8. ZeRO stage 0 in its config: the plain
    engine's state is what DeepSpeed's stage 0 loads, so `loqt-ray train` resumes it under Ray."""
    from loqt_ray.config import load_config

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        None,
        NANO_RUN
        + [
            f"data.data_dir={data_dir}",
            f"train.output_dir={out}",
            "train.name=nano",
            "train.steps=8",
            "train.eval_every=8",
            "train.checkpoint_every=4",
            "scale.zero_stage=0",
        ],
    )
    return train_in_process(cfg)
