"""Encoder presets: published architectures, strict published-layout loading, hub via huggingface_hub."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wsi_mil.features.presets import PRESETS, preset_rows
from wsi_mil.features.registry import EncoderError, create_encoder, list_encoders

# Parameter counts the model cards / hub pages state (UNI2-h 681M, Virchow 632M, H-optimus-0
# 1.1B, Prov-GigaPath 1.13B, Hibou-L 304M, Hibou-B 85.7M; phikon-v2: a 1.21 GB fp32 file).
CARD_PARAMS = {
    "uni2-h": 681e6, "virchow": 632e6, "virchow2": 632e6, "h-optimus-0": 1.1e9, "prov-gigapath": 1.13e9,
    "hibou-l": 304e6, "hibou-b": 85.7e6, "phikon-v2": 1.21e9 / 4,
}  # fmt: skip
# Keys the published timm checkpoints carry (register tokens, LayerScale, SwiGLU's packed fc1).
LAYOUT_KEYS = {
    "uni": ("cls_token", "pos_embed", "blocks.23.ls2.gamma"),
    "uni2-h": ("reg_token", "blocks.23.mlp.fc1.weight"),
    "virchow2": ("reg_token", "blocks.31.ls1.gamma"),
    "h-optimus-0": ("reg_token", "blocks.39.ls1.gamma"),
    "prov-gigapath": ("blocks.39.mlp.fc2.weight",),
    "conch-v1.5": (
        "trunk.cls_token",
        "attn_pool_contrast.query",
        "attn_pool_contrast.to_kv.weight",
        "ln_contrast.bias",
    ),
    "phikon-v2": ("model.embeddings.mask_token", "model.encoder.layer.23.layer_scale1.lambda1"),
    "hibou-l": ("model.embeddings.register_tokens",),
}


def _meta_kwargs(name: str) -> dict[str, object]:
    # timm's weight init walks every module; on the meta device there is nothing to initialise
    return {} if PRESETS[name].family == "transformers" else {"weight_init": "skip"}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_in_its_published_architecture(name: str) -> None:
    preset = PRESETS[name]
    assert name in list_encoders()
    with torch.device("meta"):  # full size (up to 1.1 B parameters), no memory
        enc = create_encoder(name, weights="random", **_meta_kwargs(name))
        size = preset.preprocess.input_size
        out = enc.model(torch.empty(3, 3, size, size))
    assert out.shape == (3, preset.dim) == (3, enc.dim)
    assert enc.preprocess == preset.preprocess and enc.weights_id == "random:seed0"
    assert enc.attrs()["encoder"] == name and enc.attrs()["preprocess_input_size"] == size
    n = sum(p.numel() for p in enc.model.parameters())
    if name in CARD_PARAMS:
        assert abs(n - CARD_PARAMS[name]) / CARD_PARAMS[name] < 0.04, n
    keys = set(enc.model.state_dict()) | {k.removeprefix("vit.") for k in enc.model.state_dict()}
    assert set(LAYOUT_KEYS.get(name, ())) <= keys


def test_card_values() -> None:
    hopt = PRESETS["h-optimus-0"].preprocess
    assert hopt.mean == (0.707223, 0.578729, 0.703617) and hopt.std == (0.211883, 0.230117, 0.177517)
    assert hopt.native_mpp == 0.5 and PRESETS["conch-v1.5"].preprocess.input_size == 448
    assert {p.name: p.dim for p in PRESETS.values()} == {r["name"]: r["dim"] for r in preset_rows()}
    assert PRESETS["virchow2"].dim == 2 * 1280 and PRESETS["virchow2"].kwargs["reg_tokens"] == 4


def test_virchow_pools_class_token_and_patch_mean_without_registers() -> None:
    enc = create_encoder("virchow2", weights="random", depth=1)
    x = torch.rand(2, 3, 56, 56)  # 4 x 4 patches (dynamic_img_size), to keep it quick
    with torch.inference_mode():
        tokens = enc.model.vit(x)  # (2, 1 + 4 + 16, 1280)
        out = enc.model(x)
    assert tokens.shape == (2, 21, 1280)
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))


def test_preset_runs_in_the_extraction_runner() -> None:
    from wsi_mil.features.runtime import Runner

    enc = create_encoder("conch-v1.5", weights="random", depth=1)
    patches = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    feats = Runner(enc, "cpu")(patches)  # resized to 448, CONCH's mean/std, pooled to 768
    assert feats.shape == (2, 768) and feats.dtype == "float32"
    assert abs(float(feats[0].std()) - 1) < 0.2  # ln_contrast's output: unit variance per row


def _published_file(name: str, tmp: Path, **kw: object) -> tuple[Path, torch.nn.Module]:
    """A random model of ``name`` saved in the published key layout of its hub file."""
    torch.manual_seed(5)
    enc = create_encoder(name, weights="random", **kw)
    for p in enc.model.parameters():  # differ from the seeded init the loader would also give
        p.data.add_(torch.randn_like(p) * 0.02)
    enc.model.eval()
    if PRESETS[name].family == "transformers":
        enc.model.model.save_pretrained(tmp / name)  # transformers writes its published key names
        return tmp / name / "model.safetensors", enc.model
    path = tmp / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(path))
    return path, enc.model


# Depth 1 keeps the files small (the real ones are 1.2-4.5 GB); every block has the same keys.
SMALL = {"uni": {"depth": 1}, "conch-v1.5": {"depth": 1}, "phikon-v2": {"num_hidden_layers": 1}}
PUBLISHED_KEY = {
    "uni": "blocks.0.attn.qkv.weight",  # timm layout
    "conch-v1.5": "attn_pool_contrast.to_q.weight",  # timm trunk + CONCH's pooler
    "phikon-v2": "encoder.layer.0.attention.attention.query.weight",  # transformers (4.x names, as on the hub)
}


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    tmp = tmp_path_factory.mktemp("published")
    return {name: _published_file(name, tmp, **kw) for name, kw in SMALL.items()}


@pytest.mark.parametrize("name", list(SMALL))
def test_published_layout_loads_strictly(
    name: str, published: dict[str, tuple[Path, torch.nn.Module]], tmp_path: Path
) -> None:
    path, src = published[name]
    assert PUBLISHED_KEY[name] in load_file(str(path))
    got = create_encoder(name, weights=str(path), **SMALL[name])
    assert got.weights_id.startswith(f"file:{path.name}:")
    x = torch.rand(2, 3, 112, 112)  # any multiple of the patch: the ViTs resample their position embeddings
    with torch.inference_mode():
        torch.testing.assert_close(got.model(x), src(x), rtol=0, atol=0)
    if name == "phikon-v2":  # a downloaded model folder works too
        folder = create_encoder(name, weights=str(path.parent), **SMALL[name])
        with torch.inference_mode():
            torch.testing.assert_close(folder.model(x), src(x), rtol=0, atol=0)
    if name == "conch-v1.5":
        return  # its trunk is the timm layout tested with uni

    key = PUBLISHED_KEY[name]
    sd = load_file(str(path))
    renamed = dict(sd)
    renamed[key.replace("weight", "w")] = renamed.pop(key)
    removed = {k: v for k, v in sd.items() if k != key}
    for bad, tag in ((renamed, "renamed"), (removed, "removed")):
        bad_path = tmp_path / f"{tag}.safetensors"
        save_file(bad, str(bad_path))
        with pytest.raises(EncoderError) as exc:
            create_encoder(name, weights=str(bad_path), **SMALL[name])
        msg = str(exc.value)
        assert "\n" not in msg and str(bad_path) in msg, msg
        # transformers names the key in its current spelling (…attention.q_proj…), timm as in the file
        assert key in msg or key.replace("attention.attention.query", "attention.q_proj") in msg, msg


def test_hf_presets_say_when_transformers_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(EncoderError, match=r"pip install 'wsi-mil\[transformers\]'"):
        create_encoder("hibou-l", weights="random")


# -- the hub through huggingface_hub ------------------------------------------------------
class _ConnectProxy:
    """A real HTTP proxy on 127.0.0.1 that records each request line and refuses it (403)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """An empty hub cache, no offline switch, and a fresh huggingface_hub session after the test."""
    from huggingface_hub import close_session, constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    close_session()
    yield
    close_session()


def test_hub_request_goes_through_the_proxy(hub_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import close_session

    proxy = _ConnectProxy()
    try:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        close_session()  # huggingface_hub reads the proxy from the environment when it opens its session
        t0 = time.monotonic()
        with pytest.raises(EncoderError) as exc:
            create_encoder("uni")
        elapsed = time.monotonic() - t0
    finally:
        proxy.close()
    assert any(r.startswith("CONNECT huggingface.co:443") for r in proxy.requests), proxy.requests
    msg = str(exc.value)
    assert "\n" not in msg and f"127.0.0.1:{proxy.port}" in msg and "--weights PATH" in msg, msg
    assert elapsed < 5, elapsed


def test_offline_uncached_fails_at_once_and_cached_loads(
    hub_env: None, monkeypatch: pytest.MonkeyPatch, published: dict[str, tuple[Path, torch.nn.Module]]
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    create_encoder("texture")  # imports done, so the time is the hub's
    t0 = time.monotonic()
    with pytest.raises(EncoderError) as exc:
        create_encoder("virchow2")
    assert time.monotonic() - t0 < 5
    msg = str(exc.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and "hf download paige-ai/Virchow2" in msg, msg
    assert "--weights PATH" in msg

    # the same model in huggingface_hub's cache layout loads offline, named by its commit
    src, model = published["uni"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = Path(constants.HF_HUB_CACHE) / "models--MahmoodLab--UNI"
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    torch.save(load_file(str(src)), repo_dir / "snapshots" / commit / "pytorch_model.bin")  # the hub's file type
    enc = create_encoder("uni", depth=1)
    assert enc.weights_id == "pretrained:MahmoodLab/UNI@0123456789ab"
    x = torch.rand(1, 3, 112, 112)
    with torch.inference_mode():
        torch.testing.assert_close(enc.model(x), model(x), rtol=0, atol=0)


def test_encoders_command_lists_the_presets() -> None:
    from typer.testing import CliRunner

    from wsi_mil.cli import app

    runner = CliRunner()
    table = runner.invoke(app, ["encoders"])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:3] == ["name", "D", "input"]
    virchow2 = next(line for line in lines if line.startswith("virchow2 "))
    assert virchow2.split()[:4] == ["virchow2", "2560", "224", "0.5"] and "paige-ai/Virchow2" in virchow2
    as_json = runner.invoke(app, ["encoders", "--json"])
    rows = {r["name"]: r for r in json.loads(as_json.output)}
    assert set(rows) == set(PRESETS)
    assert rows["conch-v1.5"]["input_size"] == 448 and rows["uni"]["gated"] is True
    assert all(r["licence"] and r["hub_repo"] for r in rows.values())


# -- real forwards (slow on 2 CPU cores: up to 1.1 B parameters each) ----------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_real_random_forward(name: str) -> None:
    preset = PRESETS[name]
    a = create_encoder(name, weights="random")
    size = preset.preprocess.input_size
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = a.model(x)
    assert out.shape == (2, preset.dim) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # different patches, different features
    del a
    b = create_encoder(name, weights="random")  # seeded: the same random encoder every run
    with torch.inference_mode():
        torch.testing.assert_close(b.model(x), out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["uni", "uni2-h", "virchow2", "conch-v1.5", "phikon-v2"])
def test_presets_on_cuda_bf16_match_fp32(name: str) -> None:
    preset = PRESETS[name]
    enc = create_encoder(name, weights="random")
    model = enc.model.to("cuda")
    size = preset.preprocess.input_size
    x = torch.rand(4, 3, size, size, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        ref = model(x).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x).float()
    assert low.shape == (4, preset.dim)
    rel = (low - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.max() < 2e-2, rel
