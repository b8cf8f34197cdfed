"""The notebooks execute top to bottom in the project's Python (nbclient, a kernelspec made for the
test) and show what they promise: coloured key-score tokens and a histogram; a run's curves."""

from __future__ import annotations

import html
import json
import pathlib
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "ktae-test-python"
SPAN = re.compile(r'<span class="ktae-token" title="([^"]+)" style="background-color: rgb\((\d+), (\d+), (\d+)\)">'
                  r"(.*?)</span>", re.S)


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec running this very interpreter (whatever else `python3` resolves to)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return KERNEL


def _execute(name: str, kernel: str) -> nbformat.NotebookNode:
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The walkthrough promises < 2 minutes on a CPU; no cell may take longer than that.
    NotebookClient(book, timeout=120, kernel_name=kernel, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return book


def _outputs(book, kind: str) -> list[str]:
    out = []
    for cell in book.cells:
        for o in cell.get("outputs", []):
            if kind == "stream" and o.output_type == "stream" and o.name == "stdout":
                out.append(o.text)
            elif kind != "stream" and kind in o.get("data", {}):
                out.append(o["data"][kind])
    return out


def test_walkthrough_renders_coloured_tokens(kernel):
    book = _execute("ktae_walkthrough.ipynb", kernel)
    text = "".join(_outputs(book, "stream"))
    (page,) = _outputs(book, "text/html")
    assert len(_outputs(book, "image/png")) == 1  # the histogram

    correct = int(re.search(r"(\d+) of 16 correct", text).group(1))
    assert 0 < correct < 16  # a mixed group: KTAE has something to score
    headers = re.findall(r"<b>response (\d+)</b>: (correct|wrong)", page)
    assert [int(i) for i, _ in headers] == list(range(16))
    assert sum(v == "correct" for _, v in headers) == correct

    # One span per response token; its colour follows the sign of its score (red - white - green).
    blocks = re.split(r"<b>response \d+</b>", page)[1:]
    signs = set()
    for block in blocks:
        spans = SPAN.findall(block)
        assert spans
        for title, r, g, b in ((float(t), int(r), int(g), int(b)) for t, r, g, b, _ in spans):
            if title > 0:
                assert g > r and g > b
            elif title < 0:
                assert r > g and r > b
            else:
                assert (r, g, b) == (255, 255, 255)
            signs.add((title > 0) - (title < 0))
    assert {1, -1} <= signs
    # The coloured text is the response itself: the printed responses open their blocks.
    printed = re.findall(r"  response (\d+): (.*)", text)
    assert len(printed) == 4
    for i, response in printed:
        spans = SPAN.findall(blocks[int(i)])
        shown = "".join(html.unescape(t.replace("&#9166;<br>", "\n")) for *_, t in spans)
        assert shown.startswith(response)


def test_run_metrics_notebook(kernel, tmp_path, monkeypatch):
    run = tmp_path / "my_run"
    run.mkdir()
    with (run / "metrics.jsonl").open("w") as handle:
        for step in range(1, 8):
            handle.write(json.dumps({"step": step, "reward/mean": step / 10, "reward/accuracy": step / 20,
                                     "response/length_mean": 40.0 - step, "loss/kl": 0.001 * step}) + "\n")
    monkeypatch.setenv("KTAE_RUN_DIR", str(run))
    book = _execute("run_metrics.ipynb", kernel)
    text = "".join(_outputs(book, "stream"))
    assert ("my_run: 7 steps logged, last step 7: reward/mean = 0.7, reward/accuracy = 0.35, "
            "response/length_mean = 33, loss/kl = 0.007") in text
    assert len(_outputs(book, "image/png")) == 1
