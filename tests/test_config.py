import subprocess
import sys

import pytest

from loqt_ray.cli import main
from loqt_ray.config import ConfigError, load_config


def write(tmp_path, text):
    """A config file with `text`; no file at all for "" (an empty file is an error of its own)."""
    if not text:
        return None
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, "loqt:\n  rank: 16\n"),
        ["optim.lr=3e-4", "loqt.targets=[q_proj, v_proj]", "optim.betas=[0.9, 0.95]", "model.path="],
    )
    assert cfg.loqt.rank == 16 and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.loqt.targets == ["q_proj", "v_proj"] and cfg.model.path is None
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "text,overrides,field,allowed",
    [
        ("loqt:\n  rnak: 3\n", [], "loqt.rnak", "allowed keys are method, rank"),
        ("", ["loqt.rank=0"], "loqt.rank", "positive integer"),
        ("", ["loqt.rank=abc"], "loqt.rank", "must be an integer"),
        ("", ["loqt.schedule=cosine"], "loqt.schedule", "static, linear, exponential"),
        ("", ["loqt.quant_block_size=48"], "loqt.quant_block_size", "32, 64, 128"),
        (
            "",
            ["loqt.refresh_interval=150", "loqt.update_interval=100"],
            "loqt.refresh_interval",
            "multiple of update_interval",
        ),
        ("", ["model.size=2b"], "model.size", "tiny"),
        ("", ["optim.betas=[0.9]"], "optim.betas", "list of 2"),
        ("", ["train.steps=-1"], "train.steps", ">= 1"),
        ("", ["scale.zero_stage=3"], "scale.zero_stage", "ZeRO-3"),
        ("", ["optim.per_layer=true", "scale.num_workers=2"], "optim.per_layer", "single worker"),
        (
            "",
            ["scale.use_gpu=true", "scale.num_workers=2", "scale.gpus_per_worker=0.5"],
            "scale.gpus_per_worker",
            "whole GPUs (1)",
        ),
        ("", ["train.micro_batch_size=auto"], "train.micro_batch_size", "train.sequences_per_step"),
        ("", ["train.micro_batch_size=big"], "train.micro_batch_size", "int or one of auto"),
        (
            "",
            ["train.micro_batch_size=auto", "train.sequences_per_step=8"],
            "train.micro_batch_size",
            "scale.gpu_memory_gb",
        ),
        ("", ["train.sequences_per_step=12"], "train.sequences_per_step", "micro_batch_size x grad_accum"),
        (
            "",
            ["train.cuda_graphs=true", "scale.use_gpu=true", "train.activation_checkpointing=true"],
            "train.cuda_graphs",
            "train.activation_checkpointing=false",
        ),
        ("model: 3\n", [], "model", "must be a mapping"),
        ("- a\n- b\n", [], "c.yaml", "top level must be a mapping"),
        ("a: [\n", [], "c.yaml", "not valid YAML"),
        ("", ["data.tokenizer=/nonexistent"], "data.tokenizer", "not a directory"),
        ("", ["train.stop_at_step=0"], "train.stop_at_step", "must be in [1, train.steps"),
        ("", ["optim.name=adam8bit"], "optim.name", "scale.zero_stage=0"),
        ("", ["loqt.refresh=layerwise", "train.grad_accum=2"], "loqt.refresh", "one micro-batch per step"),
        ("", ["train.master_weights=false"], "train.master_weights", "train.dtype=bfloat16"),
        (
            "",
            ["train.master_weights=false", "train.dtype=bfloat16"],
            "train.master_weights",
            "optim.per_layer=true",
        ),
        ("", ["train.cuda_graphs=true"], "train.cuda_graphs", "scale.use_gpu=true"),
        (
            "",
            ["train.cuda_graphs=true", "scale.use_gpu=true", "train.grad_accum=2"],
            "train.cuda_graphs",
            "train.grad_accum=1",
        ),
        (
            "",
            ["train.cuda_graphs=true", "scale.use_gpu=true", "optim.per_layer=true"],
            "train.cuda_graphs",
            "optim.per_layer=false",
        ),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, overrides, field, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    assert str(err.value).startswith(field) or field in str(err.value).split(":")[0]
    assert allowed in str(err.value)


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    path = write(tmp_path, "loqt:\n  rank: -4\n")
    assert main(["train", "--config", path, "--set", f"train.output_dir={tmp_path}/runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "loqt.rank" in err
    assert not (tmp_path / "runs").exists()  # nothing written before validation passed


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "loqt_ray.cli", "train", "--set", "data.seq_len=4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("loqt-ray train: error: data.seq_len")


def test_an_empty_config_file_is_an_error_not_a_run_on_defaults(tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match="config file is empty"):
        load_config(path)
    assert main(["train", "--config", str(path), "--set", f"train.output_dir={tmp_path}/runs"]) == 2
    assert "empty.yaml: config file is empty" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_cli_starts_without_the_heavy_libraries():
    """`loqt-ray --help` and config errors must not wait for torch, transformers, Ray or DeepSpeed."""
    probe = (
        "import sys; from loqt_ray.cli import build_parser, main; import loqt_ray; "
        "main(['train', '--set', 'loqt.rank=0']); "
        "print(sorted(m for m in ('torch', 'transformers', 'bitsandbytes', 'ray', 'deepspeed') "
        "if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    assert "loqt.rank" in proc.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "loqt_ray.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and "Pretrain LLaMA-style models with LoQT" in helped.stdout


def test_paths_leave_the_driver_absolute(tmp_path, monkeypatch):
    """Ray Train workers and Tune trials run in directories of their own: every path a config
    carries is made absolute where the user gave it; caches and outputs under $LOQT_RAY_HOME."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOQT_RAY_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    for folder in ("tok", "user/model"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "user/model/config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "user/model/model.safetensors").touch()
    (tmp_path / "corpus.txt").write_text("one\n\ntwo\n")
    sets = ["data.source=corpus.txt", "data.tokenizer=tok", "model.path=~/model"]
    cfg = load_config(None, sets)
    assert (cfg.data.source, cfg.data.tokenizer) == (str(tmp_path / "corpus.txt"), str(tmp_path / "tok"))
    assert cfg.model.path == str(tmp_path / "user" / "model")
    assert (cfg.data.data_dir, cfg.train.output_dir) == (str(tmp_path / "data"), str(tmp_path / "runs"))
    monkeypatch.setenv("LOQT_RAY_HOME", str(tmp_path / "home"))
    cfg = load_config(None, [*sets, "train.output_dir=/abs/runs"])
    assert cfg.data.source == str(tmp_path / "corpus.txt")  # an input: where the user ran the command
    assert (cfg.data.data_dir, cfg.train.output_dir) == (str(tmp_path / "home" / "data"), "/abs/runs")
    for source in ("sotu", "hf:allenai/c4"):  # names, not paths
        assert load_config(None, [f"data.source={source}"]).data.source == source


def test_a_config_error_survives_pickling_as_ray_sends_it_from_a_worker():
    import pickle

    error = pickle.loads(pickle.dumps(ConfigError("data.source", "no such file: corpus.jsonl")))
    assert isinstance(error, ConfigError) and error.field == "data.source"
    assert str(error) == "data.source: no such file: corpus.jsonl"


@pytest.mark.parametrize(
    "files,message",
    [
        ({}, "no readable config.json"),
        ({"config.json": "[1, 2]"}, "no readable config.json"),
        ({"config.json": '{"model_type": "gpt2"}', "model.safetensors": ""}, "must hold a LLaMA model"),
        ({"config.json": '{"model_type": "llama"}'}, "holds no weights (one of model.safetensors"),
    ],
)
def test_a_local_model_the_workers_could_not_load_is_refused_before_any_cluster(
    tmp_path, capsys, files, message
):
    model = tmp_path / "model"
    model.mkdir()
    for name, text in files.items():
        (model / name).write_text(text)
    assert main(["train", "--set", f"model.path={model}", "--set", f"train.output_dir={tmp_path}/runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.path" in err and message in err
    assert not (tmp_path / "runs").exists()


def test_a_saved_llama_directory_is_accepted_as_the_model(tmp_path):
    from loqt_ray.models import build_model

    build_model("nano", 512).save_pretrained(tmp_path / "m")
    assert load_config(None, [f"model.path={tmp_path / 'm'}"]).model.path == str(tmp_path / "m")


def test_every_field_is_documented_where_it_is_declared_and_the_config_command_shows_it(capsys):
    """Each field's docstring is what `loqt-ray config` prints, with its type and default."""
    import dataclasses

    from loqt_ray.config import SECTIONS, field_docs

    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{section}: {missing} have no docstring"
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert out.count("; default ") == sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())
    assert "loqt.rank  (int; default 32)\n    r of the factors" in out
    assert "train.dtype  (one of float32, bfloat16; default float32)" in out
    assert main(["config", "lqt"]) == 2
    assert "SECTION: must be one of model, data" in capsys.readouterr().err
