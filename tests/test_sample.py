"""The jitted group sampler against transformers' generate, scipy chi-square and a separate forward;
the decode engine's continuous batching (fewer slots than rows) against the all-rows-at-once run."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import scipy.stats
import torch

from _model_helpers import hf_logits, left_padded_batch, make_hf_checkpoint
from ktae_jax.cli import generate as generate_cli
from ktae_jax.mesh import MeshConfig, batch_sharding, make_mesh
from ktae_jax.models import ModelOptions, load_pretrained
from ktae_jax import engine
from ktae_jax.sample import SamplingConfig, decode_params, sample, sample_jit, slot_efficiency

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


@pytest.mark.parametrize("family,slots", [("qwen2", 0), ("llama", 0), ("qwen3", 0), ("qwen2", 4)])
def test_greedy_matches_transformers_with_eos_and_masks(tmp_path, family, slots):
    """slots=4 < 8 rows: rows wait for a slot, enter it when an earlier row stops, share a batch
    with rows at other positions, and the tail is packed into fewer slots (2, then 1)."""
    folder = make_hf_checkpoint(tmp_path, family, num_key_value_heads=1 if family == "llama" else 2)
    model, _ = load_pretrained(folder)
    ids, mask = left_padded_batch([8, 3, 6, 1], 96, seed=7)
    free = sample(model, ids, mask, jax.random.key(0), SamplingConfig(R, greedy=True, num_samples=2))
    free_tokens = np.asarray(free.tokens)
    assert np.array_equal(free_tokens[0::2], free_tokens[1::2])  # greedy copies of one prompt agree
    # A stop id that row 0 emits mid-way but another row never emits: some rows stop, some never do.
    eos = next(int(t) for t in free_tokens[0, 1:R - 1] if any(t not in r for r in free_tokens[2::2]))
    cfg = SamplingConfig(R, greedy=True, eos_ids=(95, eos), pad_id=0, num_samples=2, slots=slots,
                         min_slots_per_device=1)
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
    if slots:
        assert int(got.decode_steps) > R  # 4 slots for 8 rows: some rows waited
        assert int(got.slot_steps) < slots * int(got.decode_steps)  # and the tail ran on fewer slots


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
    # Unrolled layers, as the trainer builds the model on CPU; the engine decodes it with a scan.
    model, tokenizer = load_pretrained(qwen_dir, options=ModelOptions(scan_layers=False))
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


def test_greedy_past_the_first_cache_length_matches_transformers(tmp_path):
    """R = 300: the engine's cache starts with room for 64 response tokens and grows three times."""
    folder = make_hf_checkpoint(tmp_path, "qwen2")
    model, _ = load_pretrained(folder)
    ids, mask = left_padded_batch([5, 2], 96, seed=3)
    assert engine.cache_lengths(ids.shape[1], 300) == [ids.shape[1] + n for n in (64, 128, 256, 300)]
    got = sample(model, ids, mask, jax.random.key(0), SamplingConfig(300, greedy=True, slots=1))
    np.testing.assert_array_equal(np.asarray(got.tokens), _hf_greedy(folder, ids, mask, (), 0, 300))
    assert int(got.slot_steps) == 600 and int(got.decode_steps) == 600  # one slot, two rows in turn


def test_sampling_does_not_depend_on_the_slots(qwen_dir):
    """Each row's draws are keyed by (row, position): the same rollout whatever the schedule."""
    model, _ = load_pretrained(qwen_dir)
    ids, mask = left_padded_batch([6, 2, 4], 96, seed=8)
    stops = np.array([3, 9, 1, 12, 5, 7, 2, 12, 4])  # forced: a random model has no stop of its own
    runs = [jax.device_get(sample(model, ids, mask, jax.random.key(5),
                                  SamplingConfig(12, num_samples=3, slots=s, min_slots_per_device=1),  # packs too
                                  stop_lengths_N=stops)) for s in (0, 4, 2)]
    for got in runs:
        np.testing.assert_array_equal(got.lengths, stops)
        np.testing.assert_array_equal(got.tokens, runs[0].tokens)
        np.testing.assert_array_equal(got.mask, runs[0].mask)
        for field in ("logp", "policy_logp"):  # another batch width: equal up to rounding
            np.testing.assert_allclose(getattr(got, field), getattr(runs[0], field), atol=1e-5)
    assert len(set(np.asarray(runs[0].tokens)[:, 0].tolist())) > 3  # really sampled
    assert [int(r.slot_steps) for r in runs[1:]] != [int(runs[0].slot_steps)] * 2


def test_slot_steps_hand_counted(qwen_dir):
    """4 rows of forced lengths 1, 3, 2, 2 on 2 slots: rows 0, 1 enter; it. 1: row 0 stops, row 2
    enters; it. 2; it. 3: rows 1 and 2 stop, row 3 enters and nothing waits, so the batch is packed
    to 1 slot; it. 4, 5 on that slot. 2 + 2 + 2 + 1 + 1 = 8 slot-steps, all live."""
    model, _ = load_pretrained(qwen_dir)
    ids, mask = left_padded_batch([4, 3], 96, seed=1)
    got = sample(model, ids, mask, jax.random.key(0), SamplingConfig(6, num_samples=2, slots=2, min_slots_per_device=1),
                 stop_lengths_N=np.array([1, 3, 2, 2]))
    assert (int(got.decode_steps), int(got.slot_steps)) == (5, 8)
    assert slot_efficiency(got) == 1.0
    alone = sample(model, ids, mask, jax.random.key(0), SamplingConfig(6, num_samples=2, min_slots_per_device=1),
                   stop_lengths_N=np.array([1, 3, 2, 2]))
    # 4 slots: it. 1, 2 at width 4; then only row 1 is live: packed to 2, then to 1 slot for it. 3.
    assert (int(alone.decode_steps), int(alone.slot_steps)) == (3, 4 + 4 + 1)
    # By default the tail keeps 8 slots per device: here all 4, for all 3 iterations.
    default = sample(model, ids, mask, jax.random.key(0), SamplingConfig(6, num_samples=2),
                     stop_lengths_N=np.array([1, 3, 2, 2]))
    assert (int(default.decode_steps), int(default.slot_steps)) == (3, 4 + 4 + 4)


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


def test_rollout_copy_samples_what_the_policy_samples(qwen_dir):
    """The bf16 rollout copy of a float32 / bf16-compute policy: the same rollout on 1 device (the
    model casts each weight to bf16 before use anyway); on 8 devices no weight is split over fsdp."""
    from flax import nnx

    ids, mask = left_padded_batch([6, 3], 96, seed=4)
    cfg = SamplingConfig(8, temperature=1.0, num_samples=2)
    model, _ = load_pretrained(qwen_dir, compute_dtype=jax.numpy.bfloat16)
    graphdef, params = nnx.split(model)
    copy = decode_params(params, None, jax.numpy.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(copy)} == {jax.numpy.dtype("bfloat16")}
    compiles = []  # the copy is made again after every update: it must not compile again each time
    listener = lambda event, secs, **kw: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        decode_params(params, None, jax.numpy.bfloat16)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    run = lambda state: jax.device_get(sample_jit(graphdef, state, ids, mask, jax.random.key(2), config=cfg))  # noqa: E731
    want, got = run(params), run(copy)
    for field in ("tokens", "mask", "logp", "policy_logp"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded, _ = load_pretrained(qwen_dir, mesh=mesh)
    _, sharded_params = nnx.split(sharded)
    specs = [x.sharding.spec for x in jax.tree.leaves(decode_params(sharded_params, mesh, jax.numpy.float32))]
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(sharded_params))
    assert not any("fsdp" in str(spec) for spec in specs) and any("tensor" in str(spec) for spec in specs)
    # Already in the decode dtype and layout (no fsdp split): the policy's own arrays, no second copy.
    data_only = make_mesh(MeshConfig(data=8))
    replicated, _ = load_pretrained(qwen_dir, mesh=data_only)
    _, replicated_params = nnx.split(replicated)
    assert decode_params(replicated_params, data_only, jax.numpy.float32) is replicated_params
    assert decode_params(replicated_params, data_only, jax.numpy.bfloat16) is not replicated_params


def test_bad_prompts_and_config_are_named(qwen_dir):
    with pytest.raises(ValueError, match="left-padded"):
        sample(None, np.ones((1, 3)), np.array([[1, 1, 0]]), jax.random.key(0), SamplingConfig(2))
    model, _ = load_pretrained(qwen_dir)  # max_position_embeddings=512
    with pytest.raises(ValueError, match="empty"):
        sample(model, np.ones((0, 3)), np.ones((0, 3)), jax.random.key(0), SamplingConfig(2))
    with pytest.raises(ValueError, match="prompts of 512 columns .* max_position_embeddings=512"):
        sample(model, np.ones((1, 512)), np.ones((1, 512)), jax.random.key(0), SamplingConfig(2))
    with pytest.raises(ValueError, match=r"max_new_tokens=500 .* max_position_embeddings=512 \(at most 412"):
        sample(model, np.ones((1, 100)), np.ones((1, 100)), jax.random.key(0), SamplingConfig(500))
    # Rotary positions extrapolate: a caller that says so (ktae-eval, which warns) may run past the limit.
    past = sample(model, np.ones((1, 510), np.int32), np.ones((1, 510), np.int32), jax.random.key(0),
                  SamplingConfig(4, greedy=True, beyond_positions=True))
    assert past.tokens.shape == (1, 4)
    with pytest.raises(ValueError, match="slots=-1"):
        SamplingConfig(2, slots=-1)
    with pytest.raises(ValueError, match="min_slots_per_device=0"):
        SamplingConfig(2, min_slots_per_device=0)
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


def test_eight_devices_continuous_batching_equals_one_device(qwen_dir):
    """4 batch devices, 1 slot each (every device refills from its own prompts, then packs): the
    same sampled rollout as one device decoding every row at once (draws keyed by row, position).
    One row runs past the cache's first block (64 response tokens), on the first device only."""
    ids, mask = left_padded_batch([5, 2, 4, 3], 96, seed=3)
    stops = np.array([2, 70, 1, 4, 6, 3, 5, 1])
    single, _ = load_pretrained(qwen_dir)
    want = sample(single, ids, mask, jax.random.key(2), SamplingConfig(72, num_samples=2), stop_lengths_N=stops)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded, _ = load_pretrained(qwen_dir, mesh=mesh)
    got = sample(sharded, ids, mask, jax.random.key(2), SamplingConfig(72, num_samples=2, slots=4), mesh=mesh,
                 stop_lengths_N=stops)
    np.testing.assert_array_equal(np.asarray(got.lengths), stops)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.policy_logp), np.asarray(want.policy_logp), atol=1e-5)
    # Each device: rows of lengths (2, 7) and so on one after the other on its one slot.
    assert int(got.decode_steps) == max(a + b for a, b in stops.reshape(4, 2))


def test_sampler_memory_is_one_cache_on_eight_devices(qwen_dir):
    """XLA's temporaries of the compiled sampler (8 batch devices, R = 256: five cache lengths and
    three widths) stay within 2.5x of one KV cache of all the slots per device: no phase keeps a
    cache of its own and no slot gather copies the cache to every device (it was ~9x, #14)."""
    from flax import nnx

    mesh = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    model, _ = load_pretrained(qwen_dir, mesh=mesh)
    graphdef, state = nnx.split(model)
    p, tp, r, g, slots = 16, 16, 256, 8, 64
    ids = jax.ShapeDtypeStruct((p, tp), np.int32, sharding=batch_sharding(mesh, (p, tp)))
    cfg = SamplingConfig(r, num_samples=g, slots=slots, min_slots_per_device=2)  # widths of 8, 4, 2 per device
    compiled = sample_jit.lower(graphdef, state, ids, ids, jax.random.key(0), config=cfg, mesh=mesh).compile()
    c = model.config
    cache = 2 * c.num_layers * (slots // 8) * c.num_kv_heads * (tp + r) * c.head_dim * np.dtype(model.dtype).itemsize
    assert compiled.memory_analysis().temp_size_in_bytes <= 2.5 * cache
