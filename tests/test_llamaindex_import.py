"""`embedlift adapters import-llamaindex`: checkpoints made by the real LlamaIndex package (fixtures, with the
script that made them) give the vectors LlamaIndex's AdapterEmbeddingModel gave; unsafe or unsupported files
are refused with the reason."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embedlift.models.checkpoint import base_info, load_checkpoint
from embedlift.models.errors import CheckpointError
from embedlift.models.llamaindex import read_llamaindex_adapter
from embedlift.service.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "llamaindex"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("name, kind", [("linear", "linear"), ("two_layer", "mlp")])
def test_imported_adapter_gives_llamaindex_vectors(minilm, tmp_path, name, kind):
    out = tmp_path / "adapters" / f"li-{name}"
    assert main(["adapters", "import-llamaindex", str(FIXTURES / name), "--out", str(out)]) == 0
    checkpoint = load_checkpoint(out, expected=base_info(minilm))
    assert checkpoint.config.kind == kind and checkpoint.config.apply_to == "query"
    base = minilm.encode(EXPECTED["questions"], "query")
    ours = checkpoint.adapter.transform_query(base, normalize=False)
    theirs = np.array(EXPECTED[name], dtype=np.float32)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_unsupported_and_unsafe_files_are_refused(tmp_path):
    no_residual = tmp_path / "no_residual"
    shutil.copytree(FIXTURES / "two_layer", no_residual)
    cfg = json.loads((no_residual / "config.json").read_text())
    (no_residual / "config.json").write_text(json.dumps({**cfg, "add_residual": False}))
    with pytest.raises(CheckpointError, match="no embedlift equivalent"):
        read_llamaindex_adapter(no_residual)

    class Boom:
        def __reduce__(self):
            return (print, ("code ran",))

    unsafe = tmp_path / "unsafe"
    shutil.copytree(FIXTURES / "linear", unsafe)
    (unsafe / "pytorch_model.bin").write_bytes(pickle.dumps({"linear.weight": Boom()}))
    with pytest.raises(CheckpointError, match="tensors only"):
        read_llamaindex_adapter(unsafe)

    wrong = tmp_path / "wrong"
    shutil.copytree(FIXTURES / "linear", wrong)
    torch.save({"linear.weight": torch.zeros(10, 10), "linear.bias": torch.zeros(384)}, wrong / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"shape \(10, 10\), expected \(384, 384\)"):
        read_llamaindex_adapter(wrong)

    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_llamaindex_adapter(tmp_path / "nothing")
