#!/bin/sh
# The wheels `embedlift serve` needs on the H200 device machine beyond its image (Python 3.12; torch,
# sentence-transformers, numpy, httpx, anyio, click, pyyaml, prometheus-client and uvloop are there), into .whl
# (ignored by git; carry it: benchmarks/gpu.py says how). About 26 MiB.
set -eu
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  litestar litestar-htmx polyfactory multipart rich-click msgspec faiss-cpu uvicorn httptools openai distro jiter \
  pydantic pydantic-core typing-inspection annotated-types sniffio pypdf PyStemmer bm25s
pip wheel -q --no-deps -w .whl ./client .
du -sh .whl
