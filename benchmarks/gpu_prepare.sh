#!/usr/bin/env bash
# Prepare, on this machine, what benchmarks/gpu_check.py needs on a lent GPU machine, which
# cannot reach the internet: the wheels of anndata, scanpy and scvi-tools that its Python
# (3.12 with torch+CUDA, numpy, scipy, pandas, h5py, numba at stop 20) lacks, downloaded for
# that Python into .gpu_wheels/, and the pbmc3k file in .gpu_data/. Both are git-ignored:
# the device tool's `run` must carry them. Prints the call to make.
#
#     bash benchmarks/gpu_prepare.sh            # GPU_PYTHON_VERSION=3.12 by default
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON_VERSION:-3.12}
DATA=${SCVAE_TOOLS_DATA_DIR:-../shared/data}
rm -rf .gpu_wheels && mkdir -p .gpu_wheels .gpu_data
python3 -m pip download --quiet --no-deps -d .gpu_wheels --platform manylinux2014_x86_64 \
  --python-version "$PY" --only-binary=:all: \
  anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 \
  scverse-misc==0.0.3 session-info2==0.4.1 zarr==3.1.6 numcodecs==0.16.6 \
  donfig==0.8.1.post1 google-crc32c==1.9.0 \
  scanpy==1.11.5 umap-learn==0.5.12 pynndescent==0.7.0 \
  scvi-tools==1.4.2 ml-collections mudata==0.3.10 pyro-ppl==1.9.2 pyro-api==0.1.2 \
  sparse==0.19.3
# docrep (a scvi-tools dependency) has no wheel on the index: build its pure-Python one here.
python3 -m pip wheel --quiet --no-deps -w .gpu_wheels docrep==0.3.2
cp "$DATA/pbmc3k_hvg_counts.h5ad" .gpu_data/
du -sh .gpu_wheels .gpu_data
cat <<'CALL'
Then, with the device tool (one call; ~6 minutes of the 15 on an H100):
  run(carry=[".gpu_wheels", ".gpu_data"], timeout_s=480, command=
      "python3 -m pip install -q --no-deps --no-index --target /tmp/gd .gpu_wheels/*.whl &&
       PYTHONPATH=/tmp/gd:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py
       --out $OUT --data-dir .gpu_data --budget 290")
  (gpu_check.py writes gpu_check.json, log.txt and profile.txt into $OUT itself.)
CALL
