"""Tests for unilens.display: plotly figures (cells, shapes, rendering) and the HTML attention viewer.

Oracles: torch.topk / explicit expected strings for figure contents, and a headless Chromium
(Playwright) that loads the written HTML files and reads the DOM / canvas pixels back.
Set UNILENS_NO_BROWSER=1 to skip the browser checks (they fail, with install instructions, when
Playwright or Chromium is missing).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from unilens.testing import make_tokenizer
from unilens.ui.display import (
    attention_viewer_html,
    plot_logit_lens_heatmap,
    plot_patching_heatmap,
    plot_topk_tokens,
    token_label,
)

CHROMIUM = os.environ.get("UNILENS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = (
    "the browser tests need Playwright for Python and Debian's Chromium: "
    "`apt-get install -y chromium` and `pip install playwright` (do not run `playwright install`); "
    "set UNILENS_NO_BROWSER=1 to skip them"
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(512)


class StubTokenizer:
    """A tokenizer whose tokens contain HTML, to check escaping end to end."""

    tokens = ["<b>bold</b>", "a&b", " x", "<|pad|>", "\n", "plain"]

    def decode(self, ids):
        return "".join(self.tokens[i] for i in ids)

    def convert_ids_to_tokens(self, i):
        return self.tokens[i]

    def __len__(self):
        return len(self.tokens)


# ------------------------------------------------------------------------------------------
# Browser (headless Chromium via Playwright)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("UNILENS_NO_BROWSER") == "1":
        pytest.skip("UNILENS_NO_BROWSER=1")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"Playwright is not installed: {INSTALL_HINT}")
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if path is None:
        pytest.fail(f"Chromium not found at {CHROMIUM}: {INSTALL_HINT}")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, file: Path):
    """Open `file` and record console errors, page errors, dialogs and any non-file request."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))

    def route(r):
        if not r.request.url.startswith("file://"):
            problems.append(f"network request: {r.request.url}")
            r.abort()
        else:
            r.continue_()

    page.route("**/*", route)
    page.goto(file.resolve().as_uri())
    return page, problems


def assert_no_remote_references(text: str) -> None:
    """No <script src=http...>, <link href=http...> or CSS url(http...)."""
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", text, re.I)
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']?(https?:)?//", text, re.I)
    assert not re.search(r"url\(\s*[\"']?(https?:)?//", text, re.I)


# ------------------------------------------------------------------------------------------
# token_label
# ------------------------------------------------------------------------------------------


def test_token_label(tok):
    assert token_label(tok, tok(" Paris", add_special_tokens=False)["input_ids"][0]) == "␣Paris"
    assert token_label(tok, tok("Paris", add_special_tokens=False)["input_ids"][0]) == "Paris"
    assert token_label(tok, tok("\n", add_special_tokens=False)["input_ids"][0]) == "\\n"
    assert token_label(tok, tok.pad_token_id) == "<|pad|>"
    assert token_label(tok, 500) == "[id 500]"  # the model vocab (512) is larger than the tokenizer's
    assert token_label(StubTokenizer(), 0) == "<b>bold</b>"  # raw text; plots escape it themselves


# ------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------


def random_probs(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(*shape, generator=gen)).softmax(-1)


def test_plot_topk_tokens_cells(tok):
    probs = random_probs(3, 512)  # (layers, vocab)
    fig = plot_topk_tokens(probs, tok, k=4, title="top")
    assert len(fig.data) == 1
    heat = fig.data[0]
    order = probs.argsort(dim=-1, descending=True)[:, :4]  # oracle: full sort
    for layer in range(3):
        assert list(heat.customdata[layer]) == order[layer].tolist()
        assert list(heat.z[layer]) == pytest.approx(probs[layer, order[layer]].tolist(), abs=1e-7)
        assert list(heat.text[layer]) == [html.escape(token_label(tok, i), quote=False) for i in order[layer].tolist()]
    assert list(heat.x) == ["1", "2", "3", "4"] and list(heat.y) == [0, 1, 2]
    assert fig.layout.title.text == "top"

    batched = random_probs(2, 3, 512, seed=1)  # (batch, layers, vocab)
    fig = plot_topk_tokens(batched, tok, k=2)
    assert len(fig.data) == 2
    for b in range(2):
        expected = batched[b].argsort(dim=-1, descending=True)[:, :2]
        assert [list(r) for r in fig.data[b].customdata] == expected.tolist()


def test_plot_topk_tokens_rejects_bad_input(tok, tmp_path):
    with pytest.raises(ValueError, match="softmax"):
        plot_topk_tokens(torch.randn(3, 512), tok)  # logits, not probabilities
    with pytest.raises(ValueError, match="dimensions"):
        plot_topk_tokens(random_probs(1, 2, 3, 512), tok)  # (vocab,) is accepted, as in nnterp
    with pytest.raises(ValueError, match="k must be"):
        plot_topk_tokens(random_probs(3, 512), tok, k=0)
    with pytest.raises(ValueError, match=r"\.html, \.png or \.svg"):
        plot_topk_tokens(random_probs(3, 512), tok, file=tmp_path / "fig.txt")


def test_plot_topk_tokens_html_renders_offline(browser, tmp_path):
    stub = StubTokenizer()
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02], [0.02, 0.03, 0.05, 0.1, 0.3, 0.5]])  # (layers, vocab)
    file = tmp_path / "topk.html"
    plot_topk_tokens(probs, stub, k=3, file=file)
    text = file.read_text(encoding="utf-8")
    assert_no_remote_references(text)
    page, problems = open_page(browser, file)
    page.wait_for_selector("svg.main-svg")
    rendered = page.evaluate("Array.from(document.querySelectorAll('svg text')).map(e => e.textContent)")
    # Cell texts render verbatim, HTML-looking tokens included (plotly would eat an unescaped "<b>").
    for label in ["<b>bold</b>", "a&b", "␣x", "plain", "\\n", "<|pad|>"]:
        assert label in rendered, (label, rendered)
    assert problems == []
    page.close()


def test_plot_logit_lens_heatmap(tok):
    probs = random_probs(3, 5, 512, seed=2)  # (layers, positions, vocab)
    inputs = ["The", " cat", " sat", "<b>", " on"]
    fig = plot_logit_lens_heatmap(probs, tok, inputs, k=3, title="lens")
    heat = fig.data[0]
    order = probs.argsort(dim=-1, descending=True)[..., :3]  # (layers, positions, 3)
    for layer in range(3):
        for pos in range(5):
            ids = order[layer, pos].tolist()
            assert heat.z[layer][pos] == pytest.approx(probs[layer, pos, ids[0]].item(), abs=1e-7)
            assert heat.text[layer][pos] == html.escape(token_label(tok, ids[0]), quote=False)
            lines = heat.customdata[layer][pos].split("<br>")
            assert lines == [
                f"{html.escape(token_label(tok, i), quote=False)}: {probs[layer, pos, i].item():.4f}" for i in ids
            ]
    assert list(fig.layout.xaxis.ticktext) == ["The", " cat", " sat", "&lt;b&gt;", " on"]
    ids = tok("The cat", add_special_tokens=False)["input_ids"]
    fig = plot_logit_lens_heatmap(random_probs(2, len(ids), 512), tok, ids)  # ids are decoded
    assert list(fig.layout.xaxis.ticktext) == [token_label(tok, i) for i in ids]
    with pytest.raises(ValueError, match="input_tokens"):
        plot_logit_lens_heatmap(probs, tok, inputs[:4])


def test_plot_patching_heatmap():
    values = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.25, -0.5]])  # (layers, positions)
    fig = plot_patching_heatmap(values, x_labels=["a", "<b>", "c"], title="patching")
    heat = fig.data[0]
    assert [list(r) for r in heat.z] == values.tolist()
    assert heat.zmid == 0 and heat.zmin == -2.0 and heat.zmax == 2.0
    assert list(fig.layout.xaxis.ticktext) == ["a", "&lt;b&gt;", "c"]
    with pytest.raises(ValueError, match="x_labels"):
        plot_patching_heatmap(values, x_labels=["a"])
    with pytest.raises(ValueError, match="2-D"):
        plot_patching_heatmap(values[0])


def test_missing_plotly_and_pandas_say_how_to_install(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(ImportError, match=r"pip install 'unilens\[display\]'"):
        plot_topk_tokens(random_probs(2, 512), tok)
    monkeypatch.setitem(sys.modules, "pandas", None)
    from unilens.analysis.prompts import Prompt, prompts_to_df

    with pytest.raises(ImportError, match=r"pip install 'unilens\[display\]'"):
        prompts_to_df([Prompt.from_strings("x", "Paris", tok)], tok)


# ------------------------------------------------------------------------------------------
# Attention viewer
# ------------------------------------------------------------------------------------------

TOKENS = ["<script>alert(1)</script>", "a&b", " x", "\n", "<b>bold</b>", "ok"]
BASE = (8, 48, 107)  # the viewer's documented colour for weight 1 (weight 0 is white)
FADE = 0.75  # rows other than the hovered query are blended this much towards white


def attention_tensor(layers: int = 3, heads: int = 4, n: int = len(TOKENS), seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = 2 * torch.randn(layers, heads, n, n, generator=gen)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (layers, heads, query, key)


def expected_rgb(v: float, faded: bool) -> list[int]:
    out = []
    for b in BASE:
        x = 255 - v * (255 - b)
        if faded:
            x = x + FADE * (255 - x)
        out.append(round(x))
    return out


def test_attention_viewer_static(tmp_path):
    att = attention_tensor()
    page = attention_viewer_html(att, TOKENS, path=tmp_path / "a.html", title="<i>viewer</i>")
    assert (tmp_path / "a.html").read_text(encoding="utf-8") == page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert_no_remote_references(page)
    assert "<script>alert" not in page and "<b>bold" not in page  # tokens escaped
    assert "<title>&lt;i&gt;viewer&lt;/i&gt;</title>" in page
    raw = re.search(r'<script type="application/json" id="unilens-attention-data">(.*?)</script>', page, re.S)
    data = json.loads(raw.group(1))
    assert data["tokens"] == TOKENS
    assert [layer["index"] for layer in data["layers"]] == [0, 1, 2]
    embedded = torch.tensor([layer["heads"] for layer in data["layers"]], dtype=torch.float64).view(att.shape)
    torch.testing.assert_close(embedded, att.double(), atol=5.1e-5, rtol=0)  # rounded to 4 decimals

    with pytest.raises(ValueError, match="6 tokens"):
        attention_viewer_html(att[:, :, :5, :5], TOKENS)
    with pytest.raises(ValueError, match="scores"):
        attention_viewer_html(torch.randn(1, 2, 6, 6), TOKENS)
    with pytest.raises(ValueError, match="batch"):
        attention_viewer_html(att[None], TOKENS)


def test_attention_viewer_in_browser(browser, tmp_path):
    att = attention_tensor()  # (3 layers, 4 heads, 6, 6)
    file = tmp_path / "attention.html"
    attention_viewer_html(att, TOKENS, path=file)
    page, problems = open_page(browser, file)
    page.wait_for_selector("body[data-ready='1']")

    assert page.locator("[data-head]").count() == 4
    assert page.eval_on_selector_all("[data-head]", "els => els.map(e => e.dataset.head)") == ["0.0", "0.1", "0.2", "0.3"]
    texts = page.eval_on_selector_all(".token", "els => els.map(e => e.textContent)")
    assert texts == [t.replace("\n", "\\n") for t in TOKENS]  # shown as text, never parsed as HTML
    assert page.locator("#tokens b").count() == 0 and page.locator("#tokens script").count() == 0
    assert page.eval_on_selector_all("option", "els => els.length") == 3

    def pixel(head: str, q: int, k: int) -> list[int]:
        return page.evaluate(
            """([head, q, k]) => {
                const c = document.querySelector(`[data-head="${head}"] canvas`);
                const cell = c.width / %d;
                return Array.from(c.getContext("2d").getImageData(k * cell + cell / 2, q * cell + cell / 2, 1, 1).data).slice(0, 3);
            }"""
            % len(TOKENS),
            [head, q, k],
        )

    def assert_pixel(head: str, q: int, k: int, rgb: list[int]) -> None:
        got = pixel(head, q, k)
        assert all(abs(a - b) <= 1 for a, b in zip(got, rgb)), (head, q, k, got, rgb)

    # Before hovering: no highlighted query, every cell in full colour.
    assert page.eval_on_selector_all("[data-head]", "els => els.map(e => e.dataset.query)") == [""] * 4
    assert_pixel("0.2", 4, 1, expected_rgb(att[0, 2, 4, 1].item(), faded=False))

    # Hover token 4: its row stays in full colour in every head, other rows fade, the strip marks it.
    page.hover(".token[data-index='4']")
    assert page.eval_on_selector_all("[data-head]", "els => els.map(e => e.dataset.query)") == ["4"] * 4
    assert page.eval_on_selector_all(".token.query", "els => els.map(e => e.dataset.index)") == ["4"]
    for h in range(4):
        for k in range(len(TOKENS)):
            assert_pixel(f"0.{h}", 4, k, expected_rgb(att[0, h, 4, k].item(), faded=False))
        assert_pixel(f"0.{h}", 2, 0, expected_rgb(att[0, h, 2, 0].item(), faded=True))
    assert page.inner_text("#info") == "query 4: <b>bold</b>"

    # Switch to layer 2: 4 heads named 2.h, the highlighted query is kept.
    page.select_option("#layer-select", "2")
    assert page.eval_on_selector_all("[data-head]", "els => els.map(e => e.dataset.head)") == ["2.0", "2.1", "2.2", "2.3"]
    assert page.eval_on_selector_all("[data-head]", "els => els.map(e => e.dataset.query)") == ["4"] * 4
    assert_pixel("2.3", 4, 3, expected_rgb(att[2, 3, 4, 3].item(), faded=False))

    # Leaving the token strip clears the highlight.
    page.mouse.move(0, 0)
    assert page.eval_on_selector_all("[data-head]", "els => els.map(e => e.dataset.query)") == [""] * 4
    assert page.locator(".token.query").count() == 0
    assert problems == []
    page.close()


def test_attention_viewer_dict_of_layers(browser, tmp_path):
    att = attention_tensor(layers=2, heads=4)
    layers = {5: att[0], 1: att[1, :2]}  # e.g. only some layers have attention, with different head counts
    file = tmp_path / "dict.html"
    attention_viewer_html(layers, TOKENS, path=file)
    page, problems = open_page(browser, file)
    page.wait_for_selector("body[data-ready='1']")
    assert page.eval_on_selector_all("option", "els => els.map(e => e.textContent)") == [
        "layer 1 (2 heads)",
        "layer 5 (4 heads)",
    ]
    assert page.eval_on_selector_all("[data-head]", "els => els.map(e => e.dataset.head)") == ["1.0", "1.1"]
    page.select_option("#layer-select", "1")
    assert page.eval_on_selector_all("[data-head]", "els => els.map(e => e.dataset.head)") == ["5.0", "5.1", "5.2", "5.3"]
    assert problems == []
    page.close()


# ------------------------------------------------------------------------------------------
# Readable sizes, axis labels and colour scale, image export (issue 27)
# ------------------------------------------------------------------------------------------


def test_plot_topk_tokens_default_size_grows_with_layers(tok):
    fig = plot_topk_tokens(random_probs(30, 512), tok, k=5)  # a 30-layer model's logit lens
    plot_height = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b if fig.layout.margin.t else \
        fig.layout.height - 180  # plotly's default margins: 100 top, 80 bottom
    assert plot_height / 30 >= 24  # px a layer row: room for 12 px cell text (nnterp's 300 px gave 4)
    assert fig.layout.yaxis.dtick == 1  # every layer labelled
    assert fig.layout.width >= 110 * 5  # px a rank column
    small = plot_topk_tokens(random_probs(3, 512), tok, k=2)
    assert small.layout.height < fig.layout.height
    batched = plot_topk_tokens(random_probs(2, 30, 512), tok, k=5)
    assert batched.layout.height == 2 * fig.layout.height  # per prompt's subplot
    # nnterp's signature (height=300, width=400) is kept; sizes are minimums, so a larger one is taken as asked
    assert plot_topk_tokens(random_probs(30, 512), tok, height=1200, width=900).layout.height == 1200


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_png_export(tmp_path):
    """kaleido (the display extra, the lock) writes PNGs through Debian's Chromium (`make browser`)."""
    if os.environ.get("UNILENS_NO_BROWSER") == "1":
        pytest.skip("UNILENS_NO_BROWSER=1")
    stub = StubTokenizer()
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02], [0.02, 0.03, 0.05, 0.1, 0.3, 0.5]])
    file = tmp_path / "topk.png"
    fig = plot_topk_tokens(probs, stub, k=3, file=file)
    assert _png_size(file) == (fig.layout.width, fig.layout.height)
    assert (tmp_path / "topk.html").is_file()  # save_html: the interactive page beside it


def test_image_export_errors_are_one_line(monkeypatch, tok, tmp_path):
    import plotly.basedatatypes

    def no_kaleido(self, *args, **kwargs):  # what plotly 7 raises where kaleido is not installed
        raise RuntimeError('\nImage export requires the Kaleido package, v1.0.0 or greater,\nwhich can be installed '
                           'using pip:\n\n    $ pip install --upgrade "kaleido>=1"\n')

    monkeypatch.setattr(plotly.basedatatypes.BaseFigure, "write_image", no_kaleido)
    monkeypatch.setitem(sys.modules, "kaleido", None)  # not installed
    with pytest.raises(ImportError, match=r"needs kaleido .*pip install 'unilens\[display\]'") as err:
        plot_topk_tokens(random_probs(2, 512), tok, file=tmp_path / "a.png")
    assert "\n" not in str(err.value)
    monkeypatch.delitem(sys.modules, "kaleido")

    def no_chrome(self, *args, **kwargs):  # what plotly + kaleido raise where no Chrome / Chromium is found
        raise RuntimeError("\n\nKaleido requires Google Chrome to be installed.\n\nEither download and install ...")

    monkeypatch.setattr(plotly.basedatatypes.BaseFigure, "write_image", no_chrome)
    from unilens.ui.display import ImageExportError

    with pytest.raises(ImageExportError, match="needs Chrome or Chromium.*make browser") as err:
        plot_topk_tokens(random_probs(2, 512), tok, file=tmp_path / "a.png")
    assert "\n" not in str(err.value) and isinstance(err.value, RuntimeError)


def _label_geometry(page, head: str, axis: str) -> list[dict]:
    """Each axis label's index, text and centre, and the head's canvas box (page pixels)."""
    return page.evaluate(
        """([head, axis]) => {
            const box = document.querySelector(`[data-head="${head}"]`);
            const c = box.querySelector("canvas").getBoundingClientRect();
            return Array.from(box.querySelectorAll(`.${axis} div`)).map(e => {
                const r = e.getBoundingClientRect();
                return {index: Number(e.dataset.index), text: e.textContent, x: r.left + r.width / 2,
                        y: r.top + r.height / 2, left: r.left, right: r.right, top: r.top, bottom: r.bottom,
                        c_left: c.left + 1, c_top: c.top + 1, cell: (c.width - 2) / %d};
            });
        }"""
        % page.evaluate("JSON.parse(document.getElementById('unilens-attention-data').textContent).tokens.length"),
        [head, axis],
    )


@pytest.mark.parametrize("n_tokens", [6, 90])
def test_attention_viewer_axes_and_colour_scale(browser, tmp_path, n_tokens):
    tokens = TOKENS if n_tokens == 6 else [f"t{i}" for i in range(n_tokens)]
    file = tmp_path / "axes.html"
    attention_viewer_html(attention_tensor(layers=1, heads=2, n=n_tokens), tokens, path=file)
    page, problems = open_page(browser, file)
    page.wait_for_selector("body[data-ready='1']")
    shown = [t.replace("\n", "\\n") for t in tokens]
    for head in ("0.0", "0.1"):
        keys, queries = _label_geometry(page, head, "klabels"), _label_geometry(page, head, "qlabels")
        step = keys[1]["index"] - keys[0]["index"]
        assert [k["index"] for k in keys] == list(range(0, n_tokens, step)) == [q["index"] for q in queries]
        assert step == 1 if n_tokens == 6 else step > 1  # every token, or every step-th where cells are small
        assert [k["text"] for k in keys] == [shown[k["index"]] for k in keys] == [q["text"] for q in queries]
        for k in keys:  # centred on its column of cells, above the canvas
            assert abs(k["x"] - (k["c_left"] + (k["index"] + 0.5) * k["cell"])) <= 1, k
            assert k["bottom"] <= k["c_top"]
        for q in queries:  # centred on its row, left of the canvas
            assert abs(q["y"] - (q["c_top"] + (q["index"] + 0.5) * q["cell"])) <= 1, q
            assert q["right"] <= q["c_left"]
        for a, b in zip(queries, queries[1:]):  # no two labels overlap
            assert a["bottom"] <= b["top"] + 0.5
    scale = page.evaluate("""() => {
        const bar = document.querySelector("#scale .bar");
        const ends = Array.from(document.querySelectorAll("#scale > span:not(.bar)"));
        return {image: getComputedStyle(bar).backgroundImage, ends: ends.map(e => e.textContent),
                left: ends[0].getBoundingClientRect().right <= bar.getBoundingClientRect().left,
                width: bar.getBoundingClientRect().width};
    }""")
    assert "rgb(255, 255, 255)" in scale["image"] and "rgb(8, 48, 107)" in scale["image"]  # white (0) to BASE (1)
    assert scale["ends"] == ["0", "1"] and scale["left"] and scale["width"] >= 100
    assert problems == []
    page.close()
