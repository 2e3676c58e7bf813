#!/usr/bin/env bash
# Fill .whl-ray/ (git-ignored) with Ray and what a sweep needs beside it that the GPU machine's image
# lacks (its image has torch, transformers, numpy, pandas, pyarrow, pyyaml, psutil, ...), at the
# versions constraints.txt pins, as one archive cut in parts under the 64 MiB one call may carry:
# Ray's own wheel is 79 MB. Carry part aa with one call and part ab with the next; files carried to a
# warm machine stay, and bench/gpu_sweep.sh joins them there.
set -eu
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" constraints.txt | head -1; }
rm -rf .whl-ray && mkdir -p .whl-ray/wheels
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl-ray/wheels "ray[tune,train,default]==$(pin ray | cut -d= -f3)" "$(pin optuna)"
cd .whl-ray/wheels
# what the image has already (bench/gpu_wheels.sh carries the rest of loqt-ray's own needs)
rm -f pyarrow-* numpy-* pandas-* pyyaml-* PyYAML-* tzdata-* python_dateutil-* six-* packaging-* \
      filelock-* fsspec-* requests-* urllib3-* idna-* certifi-* charset_normalizer-* psutil-* tqdm-*
cd ..
tar -cf ray-wheels.tar wheels && rm -rf wheels
split -b 60M ray-wheels.tar ray-wheels.tar.part- && rm ray-wheels.tar
ls -la
