"""Log-probabilities (and entropies) of given tokens under the decoder: the trainer's policy,
old-policy and reference passes. Logits are made a chunk of positions at a time, so a float32
[B, T, V] array never exists at once. Letters as in `transformer.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ktae_jax.models.kv_cache import Constrain, init_cache, unconstrained
from ktae_jax.models.transformer import Transformer, softcap_logits

Array = jax.Array


def _chunk_logprobs(h_BxCxE: Array, w_VxE: Array, targets_BxC: Array, temperature: float,
                    constrain: Constrain, softcap: float | None = None) -> tuple[Array, Array]:
    b, c, e = h_BxCxE.shape  # 2-D matmul: a faster weight gradient on CPU (see MLP)
    logits = constrain(jnp.einsum("ne,ve->nv", constrain(h_BxCxE.reshape(b * c, e)), w_VxE,
                                  preferred_element_type=jnp.float32))
    logits = softcap_logits(logits.reshape(b, c, -1), softcap) / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BxC[..., None], axis=-1)[..., 0]
    entropy = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
    return picked - lse, entropy


def _head_logprobs(model: Transformer, h_prev_BxTxE: Array, targets_BxT: Array, temperature: float,
                   chunk: int, constrain: Constrain = unconstrained) -> tuple[Array, Array]:
    """(logp, entropy) [B, T] of `targets` under the logits of the hidden states that precede them.

    Logits are made `chunk` positions at a time under `jax.checkpoint`, so a float32 [B, T, V]
    array never exists at once, forward or backward.
    """
    b, n = targets_BxT.shape
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    h_prev = jnp.pad(h_prev_BxTxE, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    num_chunks = (n + pad) // chunk
    h_chunks = h_prev.reshape(b, num_chunks, chunk, -1).swapaxes(0, 1)
    t_chunks = targets.reshape(b, num_chunks, chunk).swapaxes(0, 1)
    w = model.output_embedding().astype(model.dtype)
    cap = model.config.final_logit_softcapping
    fn = jax.checkpoint(lambda args: _chunk_logprobs(args[0], w, args[1], temperature, constrain, cap))
    logp, ent = jax.lax.map(fn, (h_chunks, t_chunks))
    return logp.swapaxes(0, 1).reshape(b, -1)[:, :n], ent.swapaxes(0, 1).reshape(b, -1)[:, :n]


def token_logprobs(
    model: Transformer, tokens_BxT: Array, attention_mask_BxT: Array, *,
    temperature: float = 1.0, chunk: int = 256,
) -> tuple[Array, Array]:
    """(logp_BxT, entropy_BxT): log p(tokens[t] | tokens[<t]) and the entropy of that distribution.

    Position 0, padded positions and each row's first real token (no context) get 0.
    """
    b, _ = tokens_BxT.shape
    h, _ = model.hidden(tokens_BxT, attention_mask_BxT)
    logp, ent = _head_logprobs(model, h[:, :-1], tokens_BxT[:, 1:], temperature, chunk)
    real = attention_mask_BxT.astype(bool)
    keep = real[:, 1:] & real[:, :-1]  # a real target predicted from a real token
    zero = jnp.zeros((b, 1), jnp.float32)
    return (
        jnp.concatenate([zero, jnp.where(keep, logp, 0.0)], axis=1),
        jnp.concatenate([zero, jnp.where(keep, ent, 0.0)], axis=1),
    )


def response_logprobs(
    model: Transformer, prompt_ids_PxTp: Array, prompt_mask_PxTp: Array, response_ids_NxR: Array,
    response_mask_NxR: Array, *, temperature: float = 1.0, chunk: int = 256, constrain: Constrain = unconstrained,
) -> tuple[Array, Array]:
    """(logp_NxR, entropy_NxR) of N = P x k responses, k consecutive rows per (left-padded) prompt.

    Each prompt is run once and its keys/values are shared by its k responses, as in sampling: the
    same numbers as `token_logprobs` on the concatenated rows (up to rounding) for about
    P*Tp + N*R tokens of work instead of N*(Tp + R), and logits only at response positions.
    Gradients reach the prompt's computation through the shared keys/values. Response tokens that
    are padding (or follow padding) get 0.

    `constrain` (on a mesh: `functools.partial(mesh.constrain_batch, mesh=...)`) keeps every
    activation split by rows, so that with FSDP-sharded weights XLA gathers the weights, as FSDP
    means to, instead of splitting the activations along the embedding and moving them.
    """
    p, tp = prompt_ids_PxTp.shape
    n, r = response_ids_NxR.shape
    if n % p:
        raise ValueError(f"{n} responses cannot be split evenly over {p} prompts")
    k = n // p
    cache = init_cache(model.config, p, tp + r, model.dtype)
    h_prompt, cache = model.hidden(prompt_ids_PxTp, prompt_mask_PxTp, cache=cache, constrain=constrain)
    rep = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731
    h_resp, _ = model.hidden(response_ids_NxR, response_mask_NxR, cache=cache.repeat_rows(k), constrain=constrain)
    # Token j is predicted from position j - 1: the prompt's last (left padding: always real) for j = 0.
    h_prev = jnp.concatenate([rep(h_prompt[:, -1:]), h_resp[:, :-1]], axis=1)
    logp, ent = _head_logprobs(model, h_prev, response_ids_NxR, temperature, chunk, constrain)
    real = response_mask_NxR.astype(bool)
    prev_real = jnp.concatenate([rep(prompt_mask_PxTp[:, -1:]).astype(bool), real[:, :-1]], axis=1)
    keep = real & prev_real
    return jnp.where(keep, logp, 0.0), jnp.where(keep, ent, 0.0)
