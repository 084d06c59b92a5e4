"""Generation from the TP=2 trained checkpoint in one CPU process: modes, sampling, streaming, the command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nulls_megatron.inference.generate import Routing, SamplingOptions, TextStream, generate
from nulls_megatron.inference.load import load_for_inference

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The school was founded in 2016 and"


_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(scope="module")
def loaded(trained_run):
    # A plain process picks a free MASTER_PORT for its gloo group and exports it; children that
    # inherit it would try to listen on the same port, so the environment is restored afterwards.
    saved = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    try:
        return load_for_inference(trained_run.checkpoint)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(loaded, prompt_ids, routing, **options):
    return generate(loaded.model, prompt_ids, routing, SamplingOptions(**options),
                    context=loaded.cfg.model.seq_length, vocab_size=loaded.vocab_size).tokens


def test_greedy_equals_an_independent_loop_and_sampling_is_seeded(loaded):
    assert loaded.sources.state.sources_manifest is not None and loaded.cfg.parallel.tensor_parallel == 1
    sp, seq = loaded.tokenizer, loaded.cfg.model.seq_length
    # A prompt near the context length, so that generation slides the window.
    prompt = sp.encode(loaded.title(3) + " " + PROMPT * 4)[: seq - 4]
    route = Routing("route", 3)
    greedy = _run(loaded, prompt, route, max_new_tokens=10)
    assert len(greedy) == 10 and greedy == _run(loaded, prompt, route, max_new_tokens=10)

    ids = list(prompt)  # the loop a reader would write over the model's logits
    with torch.no_grad():
        for _ in range(10):
            window = torch.tensor([ids[-seq:]])
            logits = loaded.model(window, source_ids=torch.zeros_like(window), sink_mode="route", route_sources=3)
            ids.append(int(logits[0, -1, : sp.get_piece_size()].argmax()))
    assert greedy == ids[len(prompt):]

    sample = dict(max_new_tokens=12, temperature=0.9, top_k=40)
    first = _run(loaded, prompt, route, seed=7, **sample)
    assert first == _run(loaded, prompt, route, seed=7, **sample)
    assert first != _run(loaded, prompt, route, seed=8, **sample)
    assert _run(loaded, prompt, route, max_new_tokens=6, temperature=1.5, top_k=1, seed=3) == greedy[:6]

    # The other modes run and use other sinks; a forgotten source's sinks stay off in all of them.
    outputs = {}
    for routing in (Routing("expected"), Routing("backbone"), Routing("route", 11)):
        outputs[routing.mode + str(routing.source)] = _run(loaded, prompt, routing, max_new_tokens=4)
    assert all(len(v) == 4 for v in outputs.values())
    window = torch.tensor([prompt])
    with torch.no_grad():
        logits = {m: loaded.model(window, source_ids=torch.zeros_like(window), **Routing(m, s).forward_kwargs())[0, -1]
                  for m, s in (("route", 3), ("expected", None), ("backbone", None))}
    assert not torch.allclose(logits["route"], logits["expected"]) and not torch.allclose(logits["expected"], logits["backbone"])
    with pytest.raises(ValueError, match="needs a source"):
        Routing("route")
    with pytest.raises(ValueError, match="prompt encodes to no tokens"):
        _run(loaded, [], route, max_new_tokens=1)


def test_streamed_text_is_the_decoded_continuation(loaded):
    sp = loaded.tokenizer
    prompt = sp.encode("Café in Zürich")
    tail = sp.encode(" served naïve crème brûlée, 東京 and Ελλάδα.")
    assert any(sp.id_to_piece(t).startswith("<0x") for t in tail)  # byte-fallback pieces arrive byte by byte
    chunks: list[str] = []
    stream = TextStream(sp, prompt, chunks.append)
    for token in tail:
        stream.push(token)
    stream.finish()
    # (The tail, encoded on its own, starts with sentencepiece's dummy-prefix space: two spaces.)
    assert "".join(chunks) == sp.decode(prompt + tail)[len("Café in Zürich"):] == "  served naïve crème brûlée, 東京 and Ελλάδα."
    assert not any("\ufffd" in c for c in chunks) and len(chunks) > 5

    # And while generating: what streams is exactly the decoded continuation.
    chunks.clear()
    stream = TextStream(sp, sp.encode(PROMPT), chunks.append)
    out = generate(loaded.model, sp.encode(PROMPT), Routing("backbone"), SamplingOptions(12, 1.0, 0, 1),
                   context=loaded.cfg.model.seq_length, vocab_size=loaded.vocab_size, on_token=stream.push)
    stream.finish()
    full = sp.decode(sp.encode(PROMPT) + out.tokens)
    assert "".join(chunks) == full[len(sp.decode(sp.encode(PROMPT))):]


def test_generate_command_streams_from_the_tp2_checkpoint(trained_run, loaded):
    env = {**{k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}, "OMP_NUM_THREADS": "1"}
    title = loaded.title(3)
    cmd = [sys.executable, "-m", "nulls_megatron.cli", "generate", str(trained_run.checkpoint), "--prompt", PROMPT,
           "--source", title, "--max-new-tokens", "8"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"routing to source 3 {title!r}" in out.stderr and "8 tokens in" in out.stderr
    sp = loaded.tokenizer
    ids = _run(loaded, sp.encode(PROMPT), Routing("route", 3), max_new_tokens=8)
    assert out.stdout == PROMPT + sp.decode(sp.encode(PROMPT) + ids)[len(sp.decode(sp.encode(PROMPT))):] + "\n"


def test_forgotten_source_refused_and_prompt_routed_to_a_survivor(trained_run, loaded, tmp_path, capsys):
    from nulls_megatron.cli import main

    run = trained_run.copy_to(tmp_path)
    manifest_path = run.checkpoint / "sinks" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["disabled_sources"], manifest["suppressed_sources"] = [0], [3]
    manifest_path.write_text(json.dumps(manifest, indent=1))
    ckpt = str(run.checkpoint)
    assert main(["generate", ckpt, "--prompt", PROMPT, "--source", loaded.title(0)]) == 2
    err = capsys.readouterr().err
    assert f"source 0 ({loaded.title(0)!r}) was forgotten" in err and ckpt in err
    assert main(["generate", ckpt, "--prompt", PROMPT, "--source", "3"]) == 2
    assert "is suppressed" in capsys.readouterr().err
    assert main(["generate", ckpt, "--prompt", PROMPT, "--source", "No Such Article"]) == 2
    assert "no source has this title" in capsys.readouterr().err
    assert main(["generate", ckpt, "--prompt", PROMPT, "--mode", "backbone", "--source", "3"]) == 2
    assert "--source applies to --mode route only" in capsys.readouterr().err

    # No --source: the index is built on the fly, and the prompt goes to its nearest surviving source
    # (the school's own title would pick source 0, which is forgotten).
    school = loaded.title(0)
    assert main(["generate", ckpt, "--prompt", school, "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "building it from the titles now" in captured.err and (run.checkpoint / "routing" / "index.json").is_file()
    info = json.loads((run.checkpoint / "routing" / "index.json").read_text())
    assert info["zeroed_sources"] == [0]  # the erased source's title was never embedded (3 is only suppressed)
    from safetensors.numpy import load_file

    rows = load_file(str(run.checkpoint / "routing" / "embeddings.safetensors"))["embeddings"]
    assert not rows[0].any() and rows[3].any()
    chosen = int(captured.err.split("routed the prompt to source ")[1].split()[0])
    assert chosen not in (0, 3) and captured.out.startswith(school)
    assert main(["generate", ckpt, "--prompt", PROMPT, "--mode", "expected", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith(PROMPT)
