"""The jitted group sampler against transformers' generate, scipy chi-square and a separate forward."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import scipy.stats
import torch

from _model_helpers import hf_logits, left_padded_batch, make_hf_checkpoint
from ktae_jax.cli import generate as generate_cli
from ktae_jax.mesh import MeshConfig, make_mesh
from ktae_jax.models import load_pretrained
from ktae_jax.sample import SamplingConfig, sample, sample_jit

R = 10


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen2", tie_word_embeddings=True)


def _hf_greedy(folder, ids, mask, eos_ids, pad_id, max_new):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = hf.generate(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(), do_sample=False,
                      max_new_tokens=max_new, eos_token_id=list(eos_ids) or None, pad_token_id=pad_id)
    return out[:, ids.shape[1]:].numpy()


def _first_stop(row: np.ndarray, eos: int) -> int:
    hits = np.flatnonzero(row == eos)
    return int(hits[0]) + 1 if hits.size else len(row)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_greedy_matches_transformers_with_eos_and_masks(tmp_path, family):
    folder = make_hf_checkpoint(tmp_path, family, num_key_value_heads=1 if family == "llama" else 2)
    model, _ = load_pretrained(folder)
    ids, mask = left_padded_batch([8, 3, 6, 1], 96, seed=7)
    free = sample(model, ids, mask, jax.random.key(0), SamplingConfig(R, greedy=True, num_samples=2))
    free_tokens = np.asarray(free.tokens)
    assert np.array_equal(free_tokens[0::2], free_tokens[1::2])  # greedy copies of one prompt agree
    # A stop id that row 0 emits mid-way but another row never emits: some rows stop, some never do.
    eos = next(int(t) for t in free_tokens[0, 1:R - 1] if any(t not in r for r in free_tokens[2::2]))
    cfg = SamplingConfig(R, greedy=True, eos_ids=(95, eos), pad_id=0, num_samples=2)
    got = sample(model, ids, mask, jax.random.key(0), cfg)
    tokens, got_mask = np.asarray(got.tokens)[0::2], np.asarray(got.mask)[0::2]
    want = _hf_greedy(folder, ids, mask, cfg.eos_ids, 0, R)
    np.testing.assert_array_equal(tokens[:, : want.shape[1]], want)
    assert np.all(tokens[:, want.shape[1]:] == 0)
    stops = [_first_stop(r, eos) for r in free_tokens[0::2]]
    assert min(stops) < R and max(stops) == R
    for row, stop in enumerate(stops):
        assert got_mask[row].tolist() == [1] * stop + [0] * (R - stop)
        assert np.all(tokens[row, stop:] == 0) and np.all(np.asarray(got.logp)[2 * row, stop:] == 0)
    np.testing.assert_array_equal(np.asarray(got.lengths)[0::2], stops)
    np.testing.assert_array_equal(np.asarray(got.logp), 0.0)  # greedy: a point mass


def _reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """softmax(logits / T), then top-k, then top-p over the renormalised survivors (HF's order)."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(x.shape, bool)
    keep[order[: top_k or len(x)]] = True
    probs = np.where(keep, np.exp(x - x.max()), 0.0)
    probs /= probs.sum()
    mass, nucleus = 0.0, np.zeros_like(keep)
    for idx in order:
        if keep[idx] and mass < top_p:
            nucleus[idx] = True
            mass += probs[idx]
    probs = np.where(nucleus, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 12, 0.9), (1.5, 0, 0.7), (1.0, 5, 1.0)])
def test_first_token_distribution_chi_square(qwen_dir, temperature, top_k, top_p):
    model, _ = load_pretrained(qwen_dir)
    ids, mask = left_padded_batch([5], 96, seed=11)
    n = 4000
    cfg = SamplingConfig(1, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=n)
    got = sample(model, ids, mask, jax.random.key(1234), cfg)
    first = np.asarray(got.tokens)[:, 0]
    raw = hf_logits(qwen_dir, ids, mask)[0, -1]
    probs = _reference_probs(raw, temperature, top_k, top_p)
    support = probs > 0
    counts = np.bincount(first, minlength=len(probs))
    assert counts[~support].sum() == 0, "sampled a token that top-k/top-p removed"
    assert 2 <= support.sum() < len(probs)
    _, p_value = scipy.stats.chisquare(counts[support], n * probs[support])
    assert p_value > 1e-3, p_value
    np.testing.assert_allclose(np.asarray(got.logp)[:, 0], np.log(probs[first]), atol=1e-4)
    log_policy = torch.log_softmax(torch.tensor(raw, dtype=torch.float64), -1).numpy()
    np.testing.assert_allclose(np.asarray(got.policy_logp)[:, 0], log_policy[first], atol=1e-4)


def test_logprobs_equal_a_separate_forward(qwen_dir):
    model, tokenizer = load_pretrained(qwen_dir)
    ids, mask = left_padded_batch([6, 2], 96, seed=5)
    cfg = SamplingConfig(8, temperature=0.8, eos_ids=(tokenizer.eos_token_id,), num_samples=3)
    got = jax.device_get(sample(model, ids, mask, jax.random.key(3), cfg))
    prompt_ids, prompt_mask = np.repeat(ids, 3, axis=0), np.repeat(mask, 3, axis=0)
    full_ids = np.concatenate([prompt_ids, got.tokens], axis=1)
    full_mask = np.concatenate([prompt_mask, got.mask], axis=1)
    logits = torch.tensor(hf_logits(qwen_dir, full_ids, full_mask)[:, ids.shape[1] - 1: -1], dtype=torch.float64)
    pick = lambda lp: np.take_along_axis(lp.numpy(), got.tokens[..., None], -1)[..., 0]  # noqa: E731
    real = got.mask.astype(bool)
    np.testing.assert_allclose(got.policy_logp[real], pick(torch.log_softmax(logits, -1))[real], atol=1e-4)
    np.testing.assert_allclose(got.logp[real], pick(torch.log_softmax(logits / 0.8, -1))[real], atol=1e-4)
    assert np.all(got.logp[~real] == 0) and np.all(got.policy_logp[~real] == 0)
    np.testing.assert_array_equal(got.lengths, got.mask.sum(-1))


def test_eight_devices_same_greedy_and_no_recompile(qwen_dir):
    ids, mask = left_padded_batch([7, 2, 5, 4], 96, seed=9)
    cfg = SamplingConfig(6, greedy=True, num_samples=2)
    single, _ = load_pretrained(qwen_dir)
    want = np.asarray(sample(single, ids, mask, jax.random.key(0), cfg).tokens)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded, _ = load_pretrained(qwen_dir, mesh=mesh)
    got = sample(sharded, ids, mask, jax.random.key(0), cfg, mesh=mesh)
    assert got.tokens.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(got.tokens), want)
    # Same shapes and config, other prompts and key: the compiled program is reused.
    compiled = sample_jit._cache_size()
    sample(single, ids[::-1] * 0 + 7, mask, jax.random.key(1), cfg)
    assert sample_jit._cache_size() == compiled


def test_bad_prompts_and_config_are_named():
    with pytest.raises(ValueError, match="left-padded"):
        sample(None, np.ones((1, 3)), np.array([[1, 1, 0]]), jax.random.key(0), SamplingConfig(2))
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingConfig(2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature=0"):
        SamplingConfig(2, temperature=0.0)


def test_generate_cli_json(qwen_dir, capsys):
    argv = ["--checkpoint", str(qwen_dir), "--prompt", "what is 2 + 3 ?", "--chat", "--greedy",
            "--max-new-tokens", "6", "-n", "2", "--json"]
    assert generate_cli.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and lines[0]["token_ids"] == lines[1]["token_ids"]
    model, tokenizer = load_pretrained(qwen_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "what is 2 + 3 ?"}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # the template's own token
    cfg = SamplingConfig(6, greedy=True, eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id)
    ro = sample(model, np.array([prompt]), np.ones((1, len(prompt))), jax.random.key(0), cfg)
    want = np.asarray(ro.tokens)[0, : int(ro.lengths[0])].tolist()
    assert lines[0]["token_ids"] == want
    assert lines[0]["text"] == tokenizer.decode(want, skip_special_tokens=True)
