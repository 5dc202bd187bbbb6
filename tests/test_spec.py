"""The base specification: one option group for every command, identity vs run settings, fingerprints that
keep matching what earlier versions wrote, a server that takes a prompt-trained adapter's settings from the
adapter, and settings checked with one clear line (CLI and service)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest

from embedlift.models.checkpoint import BaseInfo, base_info, load_checkpoint, read_config
from embedlift.models.errors import BaseMismatchError
from embedlift.models.options import SettingError
from embedlift.models.spec import DEFAULT_BASE, BaseSpec, canonical_model, load_base
from embedlift.service.settings import Settings
from tests.helpers import app_client, make_adapter, run_cli, start_server, stop_server

#: What embedlift computed for the packaged MiniLM before the base specification existed: checkpoints, caches and
#: collections written then name it, so the formula must not move.
MINILM_FINGERPRINT = "all-MiniLM-L6-v2:1f9a36d2e5229dd6"


def cli(*args: str, env: dict[str, str] | None = None, cache: Path | None = None) -> subprocess.CompletedProcess:
    extra = {"EMBEDLIFT_CACHE": str(cache)} if cache else {}
    return subprocess.run(
        [sys.executable, "-m", "embedlift.service.cli", *args], capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **extra, **(env or {})},
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -------------------------------------------------------------------------------------------- the spec
def test_flags_win_over_variables_and_values_are_typed():
    spec = BaseSpec.from_sources(
        {"query_prompt": "query: ", "max_seq_length": None, "precision": "bf16"},
        {"EMBEDLIFT_QUERY_PROMPT": "ignored", "EMBEDLIFT_MAX_SEQ_LENGTH": "128", "EMBEDLIFT_BATCH_SIZE": "8", "EMBEDLIFT_BASE": "hashing:64"},
    )
    assert spec == BaseSpec(model="hashing:64", query_prompt="query: ", max_seq_length=128, precision="bf16", batch_size=8)
    assert BaseSpec.from_sources({}, {"EMBEDLIFT_BACKEND": "torch"}).quantization is None  # torch: float32


@pytest.mark.parametrize(
    "env,message",
    [
        ({"EMBEDLIFT_MAX_SEQ_LENGTH": "abc"}, "EMBEDLIFT_MAX_SEQ_LENGTH='abc' is not valid: expected an integer from 8 to 1000000"),
        ({"EMBEDLIFT_BATCH_SIZE": "0"}, "EMBEDLIFT_BATCH_SIZE='0' is not valid: expected an integer from 1 to 65536"),
        ({"EMBEDLIFT_BACKEND": "fp8"}, "EMBEDLIFT_BACKEND='fp8' is not valid: expected one of 'torch', 'int8'"),
        ({"EMBEDLIFT_REMOTE_MAX_INPUT_TOKENS": "-1"}, "EMBEDLIFT_REMOTE_MAX_INPUT_TOKENS='-1' is not valid: expected an integer >= 16"),
    ],
)
def test_a_bad_variable_names_itself_the_value_and_what_is_allowed(env, message):
    with pytest.raises(SettingError) as err:
        BaseSpec.from_sources({}, env)
    assert err.value.message == message


def test_identity_and_run_fields():
    a = BaseSpec(query_prompt="query: ", batch_size=8, window_tokens=100, device="cpu")
    b = BaseSpec(query_prompt="", batch_size=64, window_tokens=200, threads=2)
    assert a.differences(b) == ["query_prompt: 'query: ' vs ''"]  # run fields never differ
    assert a.differences(msgspec.structs.replace(a, batch_size=1, threads=4)) == []
    recorded = BaseSpec(model=DEFAULT_BASE, query_prompt="query: ", document_prompt="", max_seq_length=256)
    assert BaseSpec().fill_from(recorded) == recorded  # nothing given: everything from the adapter
    mine = BaseSpec(query_prompt="q: ", batch_size=4).fill_from(recorded)
    assert mine.query_prompt == "q: " and mine.max_seq_length == 256 and mine.batch_size == 4  # given wins
    assert BaseSpec(model="hashing:64").fill_from(recorded) == BaseSpec(model="hashing:64")  # another model: nothing taken


def test_the_packaged_model_has_one_name_and_its_fingerprint_never_moved(minilm):
    from embedlift.models.encoders import default_model_path

    assert canonical_model(None) == canonical_model(str(default_model_path())) == DEFAULT_BASE
    assert minilm.fingerprint == MINILM_FINGERPRINT
    assert minilm.spec == BaseSpec(model=DEFAULT_BASE, query_prompt="", document_prompt="", max_seq_length=256,
                                   device="cpu", precision="fp32", runtime="torch", batch_size=32, batch_tokens=4096,
                                   window_tokens=252, window_stride=189)
    assert load_base(BaseSpec(model=str(default_model_path()))).fingerprint == MINILM_FINGERPRINT


def test_a_checkpoint_from_before_specs_still_loads_and_explains_a_mismatch(minilm, tmp_path):
    """A checkpoint recording only the encoder's ``details`` (what earlier versions wrote) loads on its base,
    and on another base the refusal names the setting that differs."""
    path = make_adapter(minilm, tmp_path / "old")
    config = json.loads((path / "config.json").read_text())
    del config["base"]["spec"]
    (path / "config.json").write_text(json.dumps(config))
    assert read_config(path).base.spec is None
    load_checkpoint(path, expected=base_info(minilm))
    prompted = load_base(BaseSpec(query_prompt="query: ", precision="fp32", runtime="torch"))
    with pytest.raises(BaseMismatchError) as err:
        load_checkpoint(path, expected=base_info(prompted))
    assert "query_prompt: '' vs 'query: '" in err.value.message
    foreign = BaseInfo(name="other", fingerprint="other:1", dim=384)  # no details, no spec: fingerprints are all we have
    with pytest.raises(BaseMismatchError, match="fingerprint .* vs other:1"):
        load_checkpoint(path, expected=foreign)


def test_the_hashing_encoder_is_a_deterministic_encoder(tmp_path):
    h = load_base(BaseSpec(model="hashing:64", max_seq_length=16))
    v = h.encode(["revenue growth", "revenue grew", "scooter fleet"], "query")
    assert v.shape == (3, 64) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]  # shared words, closer vectors
    again = subprocess.run(
        [sys.executable, "-c", "from embedlift.models.hashing import HashingEncoder as H;"
         "print(H(64, max_seq_length=16).encode(['revenue growth'], 'query')[0].tolist())"],
        capture_output=True, text=True, check=True,
    )
    np.testing.assert_allclose(json.loads(again.stdout), v[0], atol=1e-7)  # the same in another process
    long = " ".join(f"word{i}" for i in range(40))
    spans = h.split([long], "document")[0]
    assert len(spans) > 1 and spans[0][0] == 0 and spans[-1][1] == len(long)


# -------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "env,message",
    [
        ({"EMBEDLIFT_PORT": "abc"}, "EMBEDLIFT_PORT='abc' is not valid: expected an integer from 1 to 65535"),
        ({"EMBEDLIFT_CACHE_MB": "-1"}, "EMBEDLIFT_CACHE_MB='-1' is not valid: expected an integer >= 0"),
        ({"EMBEDLIFT_WATCH_INTERVAL": "soon"}, "EMBEDLIFT_WATCH_INTERVAL='soon' is not valid: expected a number >= 0"),
        ({"EMBEDLIFT_ACCESS_LOG": "maybe"}, "EMBEDLIFT_ACCESS_LOG='maybe' is not valid: expected true or false"),
        ({"EMBEDLIFT_MAX_BATCH_INPUTS": "128", "EMBEDLIFT_MAX_QUEUED_INPUTS": "64"}, "EMBEDLIFT_MAX_QUEUED_INPUTS=64 is less than"),
    ],
)
def test_service_settings_are_checked_when_read(env, message):
    with pytest.raises(SettingError) as err:
        Settings.from_sources({}, env)
    assert err.value.message.startswith(message)


def test_service_settings_read_flags_variables_and_the_base_group():
    s = Settings.from_sources(
        {"port": "9001", "query_prompt": "query: ", "access_log": True},
        {"EMBEDLIFT_METRICS_PUBLIC": "off", "EMBEDLIFT_DATA_DIR": "/tmp/x", "EMBEDLIFT_PORT": "1", "EMBEDLIFT_THREADS": "2"},
    )
    assert (s.port, s.metrics_public, s.access_log, s.data_dir) == (9001, False, True, Path("/tmp/x"))
    assert s.base == BaseSpec(query_prompt="query: ", threads=2)


def test_a_bad_variable_or_flag_is_one_line_and_exit_2(tmp_path):
    line = one_error_line(cli("serve", "--data-dir", str(tmp_path), env={"EMBEDLIFT_PORT": "abc"}))
    assert line == "embedlift: error: EMBEDLIFT_PORT='abc' is not valid: expected an integer from 1 to 65535"
    line = one_error_line(cli("serve", "--port", "70000", "--data-dir", str(tmp_path)))
    assert line == "embedlift: error: --port='70000' is not valid: expected an integer from 1 to 65535"
    line = one_error_line(cli("eval", str(tmp_path / "d.json"), env={"EMBEDLIFT_MAX_SEQ_LENGTH": "long"}))
    assert "EMBEDLIFT_MAX_SEQ_LENGTH='long' is not valid: expected an integer" in line
    line = one_error_line(cli("train", str(tmp_path / "d.json"), "--out", str(tmp_path / "o"), "--epochs", "many"))
    assert line.startswith("embedlift train: error: argument --epochs: 'many' is not an integer >= 1")
    line = one_error_line(cli("serve", "--precision", "fp8", "--data-dir", str(tmp_path)))
    assert line == "embedlift: error: --precision='fp8' is not valid: expected one of 'auto', 'bf16', 'fp16', 'fp32'"


# ------------------------------------------------------------------------- a prompt-trained adapter serves
@pytest.mark.slow
def test_an_adapter_trained_with_a_prompt_is_served_without_repeating_it(lyft_slice, shared_cache, tmp_path, minilm):
    """`embedlift train --query-prompt 'query: '` then `embedlift serve --adapter p` with no base options: the
    server takes the prompt from the adapter and serves exactly its vectors; a server started with another
    prompt refuses it over HTTP, naming the setting and both values."""
    adapters = tmp_path / "adapters"
    trained = run_cli("train", str(lyft_slice), "--kind", "linear", "--query-prompt", "query: ", "--epochs", "2",
                      "--out", str(adapters / "p"), env={"EMBEDLIFT_CACHE": str(shared_cache)})
    assert trained.returncode == 0, trained.stderr
    recorded = read_config(adapters / "p").base.spec
    assert recorded is not None and recorded.query_prompt == "query: " and recorded.model == DEFAULT_BASE

    proc, url = start_server(tmp_path / "data", adapters, "--adapter", "p", "--watch-interval", "0")
    try:
        r = httpx.post(f"{url}/embed", json={"input": "How many riders did Lyft have?"})
        assert r.status_code == 200, r.text
        assert r.json()["adapter"] == "p@1"
        prompted = load_base(BaseSpec(query_prompt="query: ", precision="fp32", runtime="torch"))
        expected = load_checkpoint(adapters / "p").adapter.transform(prompted.encode(["How many riders did Lyft have?"], "query"))
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], expected[0], atol=1e-5)
    finally:
        assert stop_server(proc) == 0
    log = proc.stdout.read()
    assert "base settings taken from adapter p: " in log and "--query-prompt 'query: '" in log

    # started again without --adapter (the app in process): the remembered active adapter decides the base
    with app_client(tmp_path / "data", adapters, base=BaseSpec(precision="fp32", runtime="torch")) as client:
        assert client.get("/adapters").json()["active"] == "p@1"

    # a server given another prompt explicitly: the adapter is refused, saying what differs and how to serve it
    with app_client(tmp_path / "data2", tmp_path / "none", base=BaseSpec(query_prompt="", precision="fp32", runtime="torch")) as client:
        r = client.post("/adapters?name=p", content=tar_of(adapters / "p"), headers={"Content-Type": "application/x-tar"})
        assert r.status_code == 409, r.text
        detail = r.json()["detail"]
        assert "query_prompt: 'query: ' vs ''" in detail and "--query-prompt 'query: '" in detail


def tar_of(directory: Path) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(directory, arcname=".")
    return buf.getvalue()
