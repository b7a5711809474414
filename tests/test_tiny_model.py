"""The builtin tiny VLM: offline build + load, a real multimodal processor, forward and generate."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from moon_rl.modeling import tiny
from moon_rl.modeling.loading import load_model, load_processor
from moon_rl.recipe import ModelSpec


@pytest.fixture(scope="module")
def model_dir():
    return tiny.builtin_model_dir(tiny.TINY_VL, size="tiny")


def test_forward_and_generate_on_image_and_text(model_dir):
    processor = load_processor(model_dir)
    assert type(processor).__name__ == "Qwen2_5_VLImageOnlyProcessor"
    assert processor.image_processor is not None
    model = load_model(model_dir, ModelSpec()).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 1.5e6  # "about 1M parameters"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a red striped shirt"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.new("RGB", (112, 112), (200, 30, 30))], return_tensors="pt")
    image_id = model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum() == 16  # 112x112 px -> 8x8 patches -> 2x2 merge -> 16 tokens
    with torch.no_grad():
        out = model(**inputs)
        assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.get_text_config().vocab_size)
        assert torch.isfinite(out.logits).all()
        generated = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 8


def test_tokenizer_knows_catalogue_words_and_chat_tokens(model_dir):
    from moon_rl.data.synthetic import BRANDS, CATEGORIES, COLOURS, MATERIALS, PATTERNS

    tokenizer = load_processor(model_dir).tokenizer
    for word in [*COLOURS, *PATTERNS, *CATEGORIES, *MATERIALS, *BRANDS]:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{word!r} is split into {tokenizer.convert_ids_to_tokens(ids)}"
    for token in ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<think>", "</think>"]:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    # Think tags survive skip_special_tokens (TRL decodes completions that way; format rewards must see them).
    ids = tokenizer("<think>red</think>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>red</think>"


def test_a_built_model_is_found_in_the_cache_and_not_rebuilt(model_dir):
    # (That a build is deterministic is checked by the no-network test below: its child builds the model afresh.)
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert tiny.builtin_model_dir(tiny.TINY_VL, size="tiny") == model_dir and weights.stat().st_mtime_ns == before


#: Prepended to the child's script where `unshare -n` is not permitted (most CI containers): every socket connection
#: and name lookup fails, and each attempt is counted, so the test runs everywhere instead of skipping.
_SOCKET_GUARD = """
import socket
ATTEMPTS = []
def _refuse(*args, **kwargs):
    ATTEMPTS.append(args[:2])
    raise OSError("network disabled by the test")
socket.socket.connect = socket.socket.connect_ex = _refuse
socket.getaddrinfo = socket.create_connection = _refuse
"""


def test_loads_with_no_network_at_all(model_dir, tmp_path):
    """The builtin model builds and loads with no network: in a network-less namespace (`unshare -n`) where that is
    permitted, else with every socket connection refused and counted (the load must not even try: the probe below is
    the one attempt). The child builds into an empty cache on another thread count, so this is also the determinism
    check: its weights and tokenizer are byte-identical to the session's build."""
    isolated = shutil.which("unshare") is not None and subprocess.run(["unshare", "-n", "true"],
                                                                        capture_output=True).returncode == 0
    script = ("" if isolated else _SOCKET_GUARD) + textwrap.dedent("""
        import socket
        try:
            socket.create_connection(("pypi.org", 443), timeout=2)
            raise SystemExit("network reachable: the test would prove nothing")
        except OSError:
            pass
        import os, torch
        # Another thread count than the session's: the build must not depend on it (it pins one thread).
        torch.set_num_threads(1 if int(os.environ["PARENT_THREADS"]) > 1 else 2)
        from moon_rl.modeling.loading import load_backbone
        from moon_rl.recipe import ModelSpec
        model, processor = load_backbone(ModelSpec(lora=None))
        print("OK", type(model).__name__, type(processor).__name__)
        from moon_rl.modeling import tiny
        print("BUILT", tiny.builtin_model_dir(tiny.TINY_VL, size="tiny"))
        if "ATTEMPTS" in globals():
            print("attempts", len(ATTEMPTS))
    """)
    env = {**os.environ, "MOON_RL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PARENT_THREADS": str(torch.get_num_threads())}
    command = ["unshare", "-n", sys.executable, "-c", script] if isolated else [sys.executable, "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK Qwen2_5_VLForConditionalGeneration Qwen2_5_VLImageOnlyProcessor" in result.stdout
    if not isolated:
        assert "attempts 1" in result.stdout  # the probe's own, and nothing else
    (built,) = [Path(line.split(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("BUILT ")]
    assert built.is_relative_to(tmp_path / "cache") and built != model_dir
    for name in ("model.safetensors", "tokenizer.json"):
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (model_dir, built)]
        assert digest[0] == digest[1], name
