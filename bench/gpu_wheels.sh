#!/usr/bin/env bash
# Download into .whl the wheels bench/gpu.sh installs on the lent GPU machine (CPython 3.12,
# manylinux x86-64, no network there), then check that every wheel's Requires-Dist is met by
# another wheel or by a package that machine already has. Run from the repo root, here:
#   bash bench/gpu_wheels.sh            (.whl is ignored by git; ~11 MiB)
# The list: what `python -m selflm.cli serve` (SQLite, no embedded worker), bench.serve and
# bench.round import and that machine lacks, at the versions of this checkout's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WHEELS=(
  alembic==1.20.1 amqp==5.4.2 annotated-types==0.8.0 billiard==4.3.2 celery==5.7.0
  click-didyoumean==0.3.1 click-plugins==1.1.1.2 click-repl==0.4.1 fastapi==0.165.0
  httptools==0.9.0 kombu==5.7.0 Mako==1.4.3 opentelemetry-api==1.45.2 prompt_toolkit==3.0.53
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
  SQLAlchemy==2.1.9 starlette==1.10.0 typing_extensions==4.16.0 typing-inspection==0.4.5
  tzlocal==5.4.5 uvicorn==0.54.0 vine==5.1.0 wcwidth==0.9.4
)
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
plat=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  plat+=(--platform "${p}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${plat[@]}" -d .whl "${WHEELS[@]}"
du -sh .whl

# Python packages on the machine's image (docs: the device's KINDS.md, read 2026-11-17).
DEVICE_PACKAGES="
  absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
  botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
  coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
  diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
  frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
  hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
  jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
  lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
  mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
  ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
  nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
  nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
  nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
  optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
  patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
  pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
  pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
  pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
  scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
  shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
  tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
  torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
  treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
  werkzeug wheel wrapt xarray xxhash yarl zipp
"
DEVICE_PACKAGES=$DEVICE_PACKAGES "$PY" - .whl <<'PYEOF'
"""Each wheel's Requires-Dist (markers for CPython 3.12 on Linux x86-64, no extras) must be
met by exactly one wheel in the folder or by the machine's packages."""
import os
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

device = {canonicalize_name(n) for n in os.environ["DEVICE_PACKAGES"].split()}
# Versions the machine was seen to have (its pip list): checked where a wheel names them.
seen = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2",
        "safetensors": "0.8.0", "tokenizers": "0.23.2", "torch": "2.11.0",
        "transformers": "5.17.0"}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}
wheels: dict[str, list[tuple[Version, Path]]] = {}
for w in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, ver = w.name.split("-")[:2]
    wheels.setdefault(canonicalize_name(name), []).append((Version(ver), w))
bad = 0
for n, vs in sorted(wheels.items()):
    if len(vs) > 1:
        print(f"TWO VERSIONS of {n}: {[str(v) for v, _ in vs]}")
        bad += 1
for n, vs in sorted(wheels.items()):
    with zipfile.ZipFile(vs[0][1]) as z:
        meta = next(x for x in z.namelist() if x.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        rn = canonicalize_name(req.name)
        if rn in wheels:
            have: str | None = str(wheels[rn][0][0])
            where = ".whl"
        elif rn in device:
            have, where = seen.get(rn), "machine"
        else:
            print(f"MISSING  {n} -> {req}")
            bad += 1
            continue
        ok = have is None or req.specifier.contains(Version(have), prereleases=True)
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'}  {n} -> {req}  ({where} {have or '?'})")
print(f"{len(wheels)} wheels, {bad} problem(s)")
sys.exit(1 if bad else 0)
PYEOF
