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
