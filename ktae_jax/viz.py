"""Pictures for notebooks and reports: KTAE key scores on response text, score histograms, run curves.

  token_pieces      the text of each response token (so colours line up with what was generated)
  key_score_html    a response with every token's background coloured by its key score, like the
                    paper's case-study figure: red (negative) - white (0) - green (positive)
  group_html        a group of responses so coloured, each headed by its verdict and advantage
  score_histogram   key scores of the tokens of correct vs wrong responses
  read_metrics / plot_metrics   a run directory's metrics.jsonl and its reward / accuracy /
                    length / KL curves (one line per run)

Nothing here computes scores; it only draws what `ktae_jax.ktae` and the trainer produce.
"""

from __future__ import annotations

import html
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Curves drawn by `plot_metrics`, in panel order: (metrics.jsonl key, panel title).
METRIC_PANELS = (
    ("reward/mean", "reward"),
    ("reward/accuracy", "accuracy"),
    ("response/length_mean", "response length (tokens)"),
    ("loss/kl", "KL to the reference"),
)


# ---------------------------------------------------------------------- coloured tokens
def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's share of the decoded text: piece i = decode(ids[:i+1]) minus decode(ids[:i]).

    Decoding prefixes (not single tokens) keeps tokenizers that merge spaces whole; a token that
    ends inside a multi-byte character gets "" and the character goes to the token completing it.
    The pieces concatenate to exactly the decoded response. Quadratic in the length: for display.
    """
    pieces, before = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            pieces.append("")
            continue
        common = len(before) if text.startswith(before) else len(os.path.commonprefix([before, text]))
        pieces.append(text[common:])
        before = text
    return pieces


def score_color(score: float, scale: float) -> str:
    """CSS colour of a key score: white at 0, saturating to red at -scale and green at +scale."""
    t = 0.0 if scale <= 0 or not math.isfinite(score) else max(-1.0, min(1.0, score / scale))
    fade = lambda full: round(255 + (full - 255) * abs(t))  # noqa: E731  (255 = white)
    red, green = (220, 50, 50), (40, 170, 70)
    r, g, b = (fade(c) for c in (red if t < 0 else green))
    return f"rgb({r}, {g}, {b})"


def key_score_html(pieces: Sequence[str], scores: Sequence[float], *, scale: float | None = None) -> str:
    """One response as HTML: a span per token, its background the key score's colour, its
    tooltip the score. `scale` (default: the largest |score|) is the score drawn at full colour."""
    if len(pieces) != len(scores):
        raise ValueError(f"{len(pieces)} token pieces but {len(scores)} scores")
    scores_R = np.asarray(scores, np.float64)
    if scale is None:
        scale = float(np.max(np.abs(scores_R))) if scores_R.size else 0.0
    spans = []
    for piece, score in zip(pieces, scores_R):
        text = html.escape(piece).replace("\n", "&#9166;<br>")
        spans.append(f'<span class="ktae-token" title="{score:+.3f}" '
                     f'style="background-color: {score_color(score, scale)}">{text}</span>')
    return f'<div style="font-family: monospace; line-height: 1.8; white-space: pre-wrap">{"".join(spans)}</div>'


def group_html(
    pieces_per_response: Sequence[Sequence[str]], key_per_response: Sequence[Sequence[float]],
    rewards: Sequence[float], advantages: Sequence[float] | None = None, *, scale: float | None = None,
) -> str:
    """A group of responses, each coloured by its tokens' key scores on one shared scale."""
    if scale is None:
        flat = [abs(s) for scores in key_per_response for s in scores]
        scale = max(flat) if flat else 0.0
    parts = [f'<p style="font-family: sans-serif">Key scores: '
             f'<span style="background-color: {score_color(-scale, scale)}">&nbsp;{-scale:+.2f}&nbsp;</span> '
             f'<span style="background-color: {score_color(0.0, scale)}; border: 1px solid #ccc">&nbsp;0&nbsp;</span> '
             f'<span style="background-color: {score_color(scale, scale)}">&nbsp;{scale:+.2f}&nbsp;</span></p>']
    for i, (pieces, keys) in enumerate(zip(pieces_per_response, key_per_response)):
        verdict = "correct" if rewards[i] > 0 else "wrong"
        adv = f", rollout advantage {advantages[i]:+.2f}" if advantages is not None else ""
        parts.append(f'<p style="font-family: sans-serif; margin-bottom: 0"><b>response {i}</b>: {verdict}{adv}</p>')
        parts.append(key_score_html(pieces, keys, scale=scale))
    return "\n".join(parts)


def score_histogram(scores_correct: Sequence[float], scores_wrong: Sequence[float], *, bins: int = 30, ax=None):
    """Histogram of token key scores in correct vs wrong responses; returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    both = np.concatenate([np.asarray(scores_correct, float), np.asarray(scores_wrong, float)])
    edges = np.linspace(both.min(), both.max(), bins + 1) if both.size and np.ptp(both) > 0 else bins
    ax.hist(scores_correct, bins=edges, alpha=0.6, color="tab:green", label=f"correct ({len(scores_correct)} tokens)")
    ax.hist(scores_wrong, bins=edges, alpha=0.6, color="tab:red", label=f"wrong ({len(scores_wrong)} tokens)")
    ax.set_xlabel("KTAE key score of the token")
    ax.set_ylabel("tokens")
    ax.legend()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- run curves
def read_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl`, in step order; a bad line is an error naming it."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a ktae-train run directory?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if "step" not in record:
            raise ValueError(f"{path}:{number}: a metrics record without 'step'")
        records.append(record)
    return sorted(records, key=lambda r: r["step"])


def metric_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric over the records that have a number for it."""
    pairs = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    steps, values = zip(*pairs) if pairs else ((), ())
    return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def plot_metrics(run_dirs: Mapping[str, str | pathlib.Path], out_png: str | pathlib.Path | None = None,
                 panels: Sequence[tuple[str, str]] = METRIC_PANELS):
    """One panel per metric that some run logged (a run without a KL term logs no `loss/kl`), one
    line per run (`{label: run_dir}`); saved to `out_png` if given."""
    import matplotlib.pyplot as plt

    runs = {label: read_metrics(path) for label, path in run_dirs.items()}
    series = {key: {label: metric_series(records, key) for label, records in runs.items()} for key, _ in panels}
    shown = [(key, title) for key, title in panels if any(steps.size for steps, _ in series[key].values())]
    if not shown:
        raise ValueError(f"none of {[key for key, _ in panels]} in the metrics of "
                         f"{', '.join(map(str, run_dirs.values()))}")
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], shown):
        for label, (steps, values) in series[key].items():
            if steps.size:
                ax.plot(steps, values, marker="." if steps.size < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0][0].legend()
    fig.tight_layout()
    if out_png is not None:
        fig.savefig(out_png, dpi=100)
    return fig
