"""``diffusers`` backend: a PLUMBING test on a tiny Stable Diffusion pipeline with random weights.

No image-generation weights ship in any package we can install and nothing can be
downloaded, so the pipeline is built here from small configs (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, a CLIPTokenizer whose vocab/merges this file writes, a DDIM
scheduler), saved with ``save_pretrained`` and loaded through LoadModel like a user's
model directory. Its images are noise: what is tested is everything around the model
(sizes, seeds, schedulers, img2img, options, errors, Free/cancel while generating), run
for real through diffusers on CPU. docs/diffusers.md gives the command that serves a real
SD model from a path.

One server for the module (torch and diffusers import once), Threads 1 (the UNet is so
small that more threads only contend).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from inferd.client import new_sync_client
from inferd.client.errors import RpcError
from inferd.proto import backend_pb2 as pb
from tests.helpers import spawned_server

# a per-test skip (not a collection skip), so that under CI=true a missing install FAILS
pytestmark = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                reason="diffusers not installed: pip install -e '.[diffusion]'")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def build_tiny_pipeline(root: Path) -> Path:
    """A complete SD 1.x-layout pipeline (VAE scale 8, 2-layer text encoder), random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = root / "tokenizer-src"
    tok_dir.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in "abcdefghijklmnopqrstuvwxyz":
            vocab[ch + suffix] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    vocab.update({"ca": len(vocab), "cat</w>": len(vocab) + 1})
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    assert pipe.vae_scale_factor == 8
    out = root / "tiny-sd"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(address, tiny pipeline dir): the server imports torch/diffusers while this process builds.

    A LoadModel of an empty directory makes the server import its stack (and fail: no
    model_index.json) while the pipeline is built here, so the two imports overlap.
    """
    root = tmp_path_factory.mktemp("diffusers")
    (root / "empty").mkdir()
    with spawned_server("--backend", "diffusers", "--load-on-start", "false", timeout=120) as (_, addr):
        warm = new_sync_client(addr, parallel=True)
        warming = threading.Thread(target=lambda: warm.load_model(ModelFile=str(root / "empty"), timeout=180))
        warming.start()
        try:
            tiny = build_tiny_pipeline(root)
        finally:
            warming.join(180)
            warm.close()
        yield addr, tiny


@pytest.fixture(scope="module")
def tiny(served) -> Path:
    return served[1]


@pytest.fixture(scope="module")
def address(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def client(address, tiny):
    c = new_sync_client(address, parallel=True)
    result = c.load_model(ModelFile=str(tiny), Threads=1, timeout=180)
    assert result.success, result.message
    yield c
    c.close()


def load(client, tiny: Path, **fields):
    result = client.load_model(ModelFile=str(tiny), Threads=1, timeout=180, **fields)
    assert result.success, result.message
    return result


def generate(client, dst: Path, **fields) -> tuple[pb.Result, np.ndarray]:
    from PIL import Image

    fields.setdefault("positive_prompt", "a cat")
    fields.setdefault("step", 2)
    reply = client.generate_image(dst=str(dst), timeout=120, **fields)
    assert reply.success, reply.message
    data = dst.read_bytes()
    assert data.startswith(PNG_MAGIC)
    with Image.open(dst) as img:
        assert img.format == "PNG"
        return reply, np.asarray(img.convert("RGB"))


def error_of(call, *args, **kwargs) -> RpcError:
    with pytest.raises(RpcError) as info:
        call(*args, **kwargs)
    return info.value


def write_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


# ---- text to image ----------------------------------------------------------------------------
def test_png_of_the_requested_size_and_seeds(client, tmp_path):
    reply, a = generate(client, tmp_path / "a.png", width=64, height=48, seed=7)
    assert a.shape == (48, 64, 3)
    assert "text-to-image: wrote 64x48 PNG" in reply.message and "seed 7" in reply.message
    _, b = generate(client, tmp_path / "b.png", width=64, height=48, seed=7)
    _, c = generate(client, tmp_path / "c.png", width=64, height=48, seed=8)
    assert np.array_equal(a, b)  # same seed, same image
    assert not np.array_equal(a, c)  # another seed, another image
    _, native = generate(client, tmp_path / "native.png", seed=7)  # 0 x 0: the model's native size
    assert native.shape == (64, 64, 3)
    _, tall = generate(client, tmp_path / "tall.png", width=16, height=80, seed=7)
    assert tall.shape == (80, 16, 3)


def test_random_seed_is_reported_and_reproduces_the_image(client, tmp_path):
    reply, first = generate(client, tmp_path / "r.png", width=32, height=32, seed=0)
    seed = int(reply.message.split("seed ")[1].split(",")[0])
    assert seed > 0
    _, again = generate(client, tmp_path / "r2.png", width=32, height=32, seed=seed)
    assert np.array_equal(first, again)


def test_negative_prompt_steps_and_clip_skip_change_the_image(client, tmp_path):
    base = {"width": 32, "height": 32, "seed": 3}
    _, plain = generate(client, tmp_path / "p.png", **base)
    _, negative = generate(client, tmp_path / "n.png", negative_prompt="blurry", **base)
    assert not np.array_equal(plain, negative)
    reply, three = generate(client, tmp_path / "s3.png", **{**base, "step": 3})
    assert "3 steps" in reply.message and not np.array_equal(plain, three)
    _, skipped = generate(client, tmp_path / "cs.png", CLIPSkip=1, **base)
    assert not np.array_equal(plain, skipped)


def test_enable_parameters_passes_only_the_named_arguments(client, tmp_path):
    base = {"width": 32, "height": 32, "seed": 5}
    _, plain = generate(client, tmp_path / "p.png", **base)
    # LocalAI's EnableParameters: negative_prompt not listed, so it is not passed
    _, listed = generate(client, tmp_path / "l.png", negative_prompt="blurry",
                         EnableParameters="num_inference_steps,width,height", **base)
    assert np.array_equal(plain, listed)
    _, none = generate(client, tmp_path / "none.png", EnableParameters="none", **base)
    assert none.shape == (64, 64, 3)  # width/height not passed: the pipeline's own default


# ---- image to image ---------------------------------------------------------------------------
def test_img2img_keeps_the_source_size_from_a_path_or_base64(client, tmp_path):
    src = write_png(tmp_path / "src.png", 40, 24)
    reply, out = generate(client, tmp_path / "i2i.png", src=str(src), seed=11, step=4)
    assert "image-to-image: wrote 40x24 PNG" in reply.message and out.shape == (24, 40, 3)
    _, again = generate(client, tmp_path / "i2i-b.png", src=base64.b64encode(src.read_bytes()).decode(), seed=11,
                        step=4)
    assert np.array_equal(out, again)
    odd = write_png(tmp_path / "odd.png", 37, 29)  # not a multiple of 8: the result still is 37x29
    _, odd_out = generate(client, tmp_path / "odd-out.png", src=str(odd), seed=11, step=4)
    assert odd_out.shape == (29, 37, 3)
    _, resized = generate(client, tmp_path / "resized.png", src=str(src), width=48, height=32, seed=11, step=4)
    assert resized.shape == (32, 48, 3)
    _, other_source = generate(client, tmp_path / "other.png", src=str(write_png(tmp_path / "s2.png", 40, 24, seed=1)),
                               seed=11, step=4)
    assert not np.array_equal(out, other_source)


# ---- load options -----------------------------------------------------------------------------
def test_schedulers_guidance_steps_strength_and_clip_skip_options(client, tiny, tmp_path):
    size = {"width": 32, "height": 32, "seed": 3}
    src = write_png(tmp_path / "src.png", 32, 32)
    try:
        r = load(client, tiny, SchedulerType="euler_a")
        assert "EulerAncestralDiscreteScheduler" in r.message
        _, euler = generate(client, tmp_path / "e.png", **size)
        r = load(client, tiny, SchedulerType="k_dpmpp_2m")
        assert "DPMSolverMultistepScheduler" in r.message
        _, dpm = generate(client, tmp_path / "d.png", **size)
        assert not np.array_equal(euler, dpm)
        # guidance 1 turns classifier-free guidance off: the negative prompt no longer matters
        load(client, tiny, CFGScale=1.0, CLIPSkip=1, Options=["steps:3", "strength:1.0"])
        _, plain = generate(client, tmp_path / "g1.png", **size)
        _, negative = generate(client, tmp_path / "g1n.png", negative_prompt="blurry", **size)
        assert np.array_equal(plain, negative)
        reply, _ = generate(client, tmp_path / "st.png", step=0, **size)
        assert "3 steps" in reply.message  # Options steps: the default for step 0
        _, full = generate(client, tmp_path / "full.png", src=str(src), seed=3, step=4)
        # same settings but strength 0.5, and CLIPSkip given per call instead of at load
        load(client, tiny, CFGScale=1.0, Options=["strength:0.5"])
        _, in_call = generate(client, tmp_path / "csc.png", CLIPSkip=1, **size)
        assert np.array_equal(plain, in_call)  # LoadModel's CLIPSkip = the request's
        _, half = generate(client, tmp_path / "half.png", src=str(src), seed=3, step=4, CLIPSkip=1)
        assert not np.array_equal(full, half)
    finally:
        load(client, tiny)


@pytest.mark.parametrize(("fields", "needle"), [
    ({"Model": "stabilityai/sd-turbo"}, "no model hub"),
    ({"ModelFile": "/nonexistent/sd"}, "does not exist"),
    ({"SchedulerType": "warp_drive"}, "unknown scheduler"),
    ({"PipelineType": "StableVideoDiffusionPipeline"}, "video pipeline"),
    ({"PipelineType": "NotAPipeline"}, "is not one of"),
    ({"LoraAdapter": "/tmp/lora.safetensors"}, "LoRA"),
    ({"Options": ["strength:2"]}, "strength"),
    ({"Options": ["steps:0"]}, "steps"),
    ({"CLIPSkip": 5}, "CLIPSkip"),
])
def test_bad_loads_fail_with_the_reason(address, tiny, fields, needle):
    c = new_sync_client(address, parallel=True)
    try:
        fields = {"ModelFile": str(tiny), **fields} if "Model" not in fields else fields
        result = c.load_model(Threads=1, timeout=180, **fields)
        assert not result.success and needle in result.message, result.message
    finally:
        load(c, tiny)  # a failed LoadModel leaves no model loaded
        c.close()


def test_a_directory_that_is_not_a_pipeline_and_a_foreign_checkpoint_fail_the_load(address, tiny, tmp_path):
    c = new_sync_client(address, parallel=True)
    try:
        result = c.load_model(ModelFile=str(tmp_path), timeout=60)
        assert not result.success and "model_index.json" in result.message
        # the real single-file path: diffusers reads the file and cannot map it without configs
        result = c.load_model(ModelFile=str(tiny / "unet" / "diffusion_pytorch_model.safetensors"), timeout=120)
        assert not result.success and "cannot load" in result.message, result.message
    finally:
        load(c, tiny)
        c.close()


# ---- bad requests -------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "code", "field"), [
    ({"width": 30, "height": 32}, grpc.StatusCode.INVALID_ARGUMENT, "width"),
    ({"width": 32, "height": 4096}, grpc.StatusCode.INVALID_ARGUMENT, "height"),
    ({"width": -8, "height": 32}, grpc.StatusCode.INVALID_ARGUMENT, "width"),
    ({"width": 32, "height": 4}, grpc.StatusCode.INVALID_ARGUMENT, "height"),
    ({"step": 1000}, grpc.StatusCode.INVALID_ARGUMENT, "step"),
    ({"step": -1}, grpc.StatusCode.INVALID_ARGUMENT, "step"),
    ({"positive_prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "positive_prompt"),
    ({"CLIPSkip": 2}, grpc.StatusCode.INVALID_ARGUMENT, "CLIPSkip"),
    ({"EnableParameters": "width,bogus"}, grpc.StatusCode.INVALID_ARGUMENT, "EnableParameters"),
    ({"dst": ""}, grpc.StatusCode.INVALID_ARGUMENT, "dst"),
    ({"dst": "/nonexistent-dir/out.png"}, grpc.StatusCode.NOT_FOUND, "dst"),
    ({"src": "/nonexistent-dir/in.png"}, grpc.StatusCode.NOT_FOUND, "src"),
    ({"src": "bm90IGFuIGltYWdl"}, grpc.StatusCode.INVALID_ARGUMENT, "src"),
    ({"ref_images": ["a.png"]}, grpc.StatusCode.UNIMPLEMENTED, "ref_images"),
])
def test_bad_requests_get_precise_codes(client, tmp_path, fields, code, field):
    request = {"positive_prompt": "a cat", "dst": str(tmp_path / "x.png"), "step": 1, **fields}
    err = error_of(client.generate_image, timeout=60, **request)
    assert err.code == code, err.details
    assert field in err.details
    assert not (tmp_path / "x.png").exists()


def test_generate_video_is_unimplemented_and_names_the_missing_model(client, tmp_path):
    err = error_of(client.generate_video, prompt="a cat", dst=str(tmp_path / "v.mp4"), timeout=30)
    assert err.code == grpc.StatusCode.UNIMPLEMENTED
    assert "video diffusion model" in err.details


async def test_before_any_load_video_is_still_unimplemented_and_image_needs_a_model(tmp_path):
    from inferd.backends.diffusers import DiffusersBackend
    from inferd.client import new_client
    from tests.helpers import running_server

    backend = DiffusersBackend()
    assert "GenerateVideo" not in backend.capabilities()
    async with running_server(backend) as server:
        c = new_client(f"127.0.0.1:{server.port}", parallel=True)
        try:
            with pytest.raises(RpcError) as info:
                await c.generate_video(prompt="a cat", dst=str(tmp_path / "v.mp4"))
            assert info.value.code == grpc.StatusCode.UNIMPLEMENTED
            assert "video diffusion model" in info.value.details
            with pytest.raises(RpcError) as info:
                await c.generate_image(positive_prompt="a cat", dst=str(tmp_path / "i.png"))
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await c.close()


def test_images_dir_confines_src_and_dst(tiny, tmp_path):
    from inferd.backends.context import CallContext
    from inferd.backends.diffusers import DiffusersBackend
    from inferd.errors import InvalidArgument
    from tests.helpers import test_settings as settings_for_test

    root = tmp_path / "images"
    root.mkdir()
    backend = DiffusersBackend(settings=settings_for_test(images_dir=str(root)))
    backend.load(pb.ModelOptions(ModelFile=str(tiny), Threads=1), CallContext("LoadModel"))
    try:
        with pytest.raises(InvalidArgument, match="^dst: .*outside INFERD_IMAGES_DIR"):
            backend.generate_image(pb.GenerateImageRequest(positive_prompt="a cat", step=1, dst=str(tmp_path / "o.png")),
                                   CallContext("GenerateImage"))
        with pytest.raises(InvalidArgument, match="^src: .*outside INFERD_IMAGES_DIR"):
            backend.generate_image(pb.GenerateImageRequest(positive_prompt="a cat", step=1, dst="in.png",
                                                           src=str(write_png(tmp_path / "s.png", 16, 16))),
                                   CallContext("GenerateImage"))
        reply = backend.generate_image(pb.GenerateImageRequest(positive_prompt="a cat", step=1, width=16, height=16,
                                                               dst="in.png"), CallContext("GenerateImage"))
        assert reply.success and (root / "in.png").read_bytes().startswith(PNG_MAGIC)
    finally:
        backend._free()


# ---- lifecycle while generating -----------------------------------------------------------------
def test_deadline_stops_the_generation_between_steps(client, tmp_path):
    started = time.monotonic()
    err = error_of(client.generate_image, positive_prompt="a cat", dst=str(tmp_path / "slow.png"), width=64,
                   height=64, step=500, timeout=1.0)
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # calls are serialized: this one only runs once the abandoned one really stopped
    generate(client, tmp_path / "next.png", width=16, height=16, seed=1, step=1)
    assert time.monotonic() - started < 20
    assert not (tmp_path / "slow.png").exists()


def test_free_and_load_while_a_generation_is_in_flight(address, tiny, tmp_path):
    outcomes: list[object] = []

    def long_call():
        c = new_sync_client(address, parallel=True)
        try:
            outcomes.append(c.generate_image(positive_prompt="a cat", dst=str(tmp_path / "long.png"), width=256,
                                             height=256, step=500, timeout=120))
        except RpcError as exc:
            outcomes.append(exc)
        finally:
            c.close()

    c = new_sync_client(address, parallel=True)
    try:
        load(c, tiny)
        worker = threading.Thread(target=long_call)
        worker.start()
        # Free only once the generation really runs (a fixed sleep raced on a quiet machine).
        wait_until = time.monotonic() + 60
        while c.status().state != pb.StatusResponse.State.BUSY and time.monotonic() < wait_until:
            time.sleep(0.05)
        assert c.status().state == pb.StatusResponse.State.BUSY
        time.sleep(0.3)
        started = time.monotonic()
        freed = c.free(timeout=60)
        assert freed.success, freed.message
        worker.join(60)
        assert time.monotonic() - started < 30  # the generation was stopped, not waited out
        (outcome,) = outcomes
        assert isinstance(outcome, RpcError) and outcome.code in (
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), outcome
        err = error_of(c.generate_image, positive_prompt="a cat", dst=str(tmp_path / "x.png"), timeout=30)
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION
        # LoadModel while calls of the newly loaded model are queued behind it
        load(c, tiny)
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(generate, c, tmp_path / f"q{i}.png", width=16, height=16, seed=i + 1, step=1)
                       for i in range(3)]
            time.sleep(0.2)
            load(c, tiny, SchedulerType="ddim")
            for f in futures:
                try:
                    f.result(60)
                except RpcError as exc:
                    assert exc.code == grpc.StatusCode.UNAVAILABLE, exc
        generate(c, tmp_path / "after.png", width=16, height=16, seed=1, step=1)
    finally:
        load(c, tiny)
        c.close()
