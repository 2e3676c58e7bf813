import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One cache of the embedded corpus, tokenizer and packed sequences for the whole session."""
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def sotu(data_dir):
    from loqt_ray.config import DataConfig
    from loqt_ray.data import prepare

    return prepare(DataConfig(data_dir=data_dir, vocab_size=2048, seq_len=128))


NANO_RUN = ["model.size=nano", "data.vocab_size=2048", "data.seq_len=64", "train.micro_batch_size=8",
            "train.eval_tokens=4096", "loqt.rank=8", "loqt.update_interval=3", "loqt.schedule=static",
            "scale.cpus_per_worker=1"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir):
    """One real nano LoQT run under Ray Train (1 DeepSpeed worker), checkpointed at steps 4 and 8."""
    import ray

    from loqt_ray.config import load_config
    from loqt_ray.launch import run_training

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, NANO_RUN + [f"data.data_dir={data_dir}", f"train.output_dir={out}", "train.name=nano",
                                        "train.steps=8", "train.eval_every=8", "train.checkpoint_every=4"])
    try:
        final = run_training(cfg, progress=False)
    finally:
        ray.shutdown()
    return out / "nano", final
