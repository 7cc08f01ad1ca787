"""Plots (plotly heatmaps of top tokens, logit lens, patching) and the self-contained HTML attention viewer."""

from __future__ import annotations

import html
import importlib.util
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..analysis.prompts import prompts_to_df

__all__ = [
    "ImageExportError",
    "plot_topk_tokens",
    "plot_logit_lens_heatmap",
    "plot_patching_heatmap",
    "attention_viewer_html",
    "token_label",
    "prompts_to_df",
]

_INSTALL_HINT = "pip install 'unilens[display]'"


class ImageExportError(RuntimeError):
    """A figure could not be written as ``.png`` / ``.svg``: kaleido found no Chrome / Chromium to drive."""


def _plotly():
    """`plotly.graph_objects` and `plotly.subplots.make_subplots`, or an ImportError saying how to install."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError as error:
        raise ImportError(f"unilens plots need plotly: {_INSTALL_HINT}") from error
    return go, make_subplots


def token_label(tokenizer, token_id: int) -> str:
    """Readable text of one token: decoded, spaces shown as `␣`, other whitespace / control characters escaped.

    A token that decodes to a partial UTF-8 character (`�`) is shown as the tokenizer's token string;
    an id the tokenizer does not know (models often pad the vocabulary) as `[id N]`.

    Example:
        >>> from unilens.testing import make_tokenizer
        >>> tok = make_tokenizer()
        >>> token_label(tok, tok(" Paris").input_ids[0]), token_label(tok, tok("\\n").input_ids[0])
        ('␣Paris', '\\\\n')
    """
    token_id = int(token_id)
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:
        text = tokenizer.convert_ids_to_tokens(token_id) or text
    if text == "" and token_id >= len(tokenizer):
        return f"[id {token_id}]"
    # Non-printable characters as escapes (newline -> "\\n", tab -> "\\t", 0x08 -> "\\x08").
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text.replace(" ", "␣")


def _plotly_text(text: str) -> str:
    # Plotly renders cell and hover text as pseudo-HTML; escape so tokens like "<s>" show verbatim.
    return html.escape(text, quote=False)


def _as_probs(probs: Any, name: str, ndims: tuple[int, ...]) -> torch.Tensor:
    """`probs` as a float32 CPU tensor with one of `ndims` dimensions and values in [0, 1]."""
    probs = torch.as_tensor(probs).detach().to("cpu", torch.float32)
    if probs.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(probs.shape)}")
    if not torch.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1 + 1e-4:
        raise ValueError(
            f"{name} must be probabilities in [0, 1] (got min {probs.min().item():.4g}, max "
            f"{probs.max().item():.4g}); apply `.softmax(-1)` to logits first"
        )
    return probs


def _write(fig, file: str | Path | None, show: bool) -> None:
    """Write `fig` to `.html` (self-contained), `.png` or `.svg`, and / or show it."""
    if file is not None:
        path = Path(file)
        suffix = path.suffix.lower()
        if suffix == ".html":
            fig.write_html(str(path), include_plotlyjs=True, full_html=True)
        elif suffix in (".png", ".svg"):
            try:
                fig.write_image(str(path))
            except (ImportError, ValueError, RuntimeError) as error:
                if importlib.util.find_spec("kaleido") is None:
                    raise ImportError(f"writing {suffix} needs kaleido (plotly's image export): {_INSTALL_HINT}, "
                                      "or write .html") from None
                if "Chrome" in str(error) or "chrome" in str(error):
                    raise ImageExportError(
                        f"writing {suffix} needs Chrome or Chromium, which kaleido drives: `make browser` installs "
                        "Debian's chromium (or run `plotly_get_chrome`; BROWSER_PATH= names one), or write .html"
                    ) from None
                raise
        else:
            raise ValueError(f"file must end in .html, .png or .svg, got {str(path)!r}")
    if show:
        fig.show()


def plot_topk_tokens(
    next_token_probs: torch.Tensor,
    tokenizer,
    k: int = 4,
    title: str | None = None,
    use_token_ids: bool = False,
    file: str | Path | None = None,
    save_html: bool = True,
    height: int = 300,
    width: int = 400,
    show: bool = False,
):
    """Heatmap of the top-k tokens at each layer: rows are layers, columns are ranks (nnterp's arguments).

    Cells show the token text (see `token_label`), colour is the probability, hover gives the token,
    its id and its probability. With a batch, one subplot per prompt, stacked.

    Args:
        next_token_probs: `(vocab,)`, `(layers, vocab)` or `(batch, layers, vocab)` probabilities (e.g. `logit_lens`).
        use_token_ids: cells show token ids instead of token text.
        file: write the figure to `.html` (self-contained, plotly.js inlined), `.png` or `.svg`; with `save_html`, a
            `.png` / `.svg` also gets an `.html` beside it.
        height, width: per prompt's subplot (pixels), nnterp's defaults; at least 26 px a layer and 110 px a rank,
            so every row stays readable (30 layers: 900 px high; nnterp's fixed 300 x 400 squeezes them into 10 px
            rows).
        show: call `fig.show()` (nnterp always shows; unilens only when asked, so scripts do not open browsers).

    Returns:
        a `plotly.graph_objects.Figure`.

    Example:
        >>> from unilens.testing import make_tokenizer
        >>> probs = torch.randn(3, 512).softmax(-1)  # (layers, vocab), e.g. logit_lens(model, prompt)[0]
        >>> fig = plot_topk_tokens(probs, make_tokenizer(), k=5, title="top 5 tokens per layer")
        >>> len(fig.data[0].text), len(fig.data[0].text[0])  # layers x rank
        (3, 5)
    """
    go, make_subplots = _plotly()
    probs = _as_probs(next_token_probs, "next_token_probs", (1, 2, 3))
    if probs.ndim == 1:
        probs = probs[None]  # (1, vocab): one layer
    if probs.ndim == 2:
        probs = probs[None]  # (1, layers, vocab)
    batch, n_layers, vocab = probs.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    top_probs, top_ids = probs.topk(k, dim=-1)  # (batch, layers, k)

    fig = make_subplots(rows=batch, cols=1, subplot_titles=[f"prompt {b}" for b in range(batch)] if batch > 1 else None)
    ranks = [str(r + 1) for r in range(k)]
    layers = list(range(n_layers))
    for b in range(batch):
        labels = [[str(i) if use_token_ids else _plotly_text(token_label(tokenizer, i)) for i in row]
                  for row in top_ids[b].tolist()]
        fig.add_trace(
            go.Heatmap(
                z=top_probs[b].tolist(),  # (layers, k)
                x=ranks,
                y=layers,
                text=labels,
                customdata=top_ids[b].tolist(),
                texttemplate="%{text}",
                hovertemplate="layer %{y}, rank %{x}<br>token %{text} (id %{customdata})<br>p = %{z:.4f}<extra></extra>",
                colorscale="Blues",
                zmin=0.0,
                zmax=float(top_probs.max()),
                showscale=b == 0,
                colorbar={"title": {"text": "p"}},
            ),
            row=b + 1,
            col=1,
        )
        fig.update_xaxes(title_text="rank", type="category", row=b + 1, col=1)
        fig.update_yaxes(title_text="layer", dtick=1, row=b + 1, col=1)  # every layer labelled: rows are 26 px
    fig.update_layout(
        title=title,
        width=max(width, 420, 110 * k + 160),
        height=batch * max(height, 260, 26 * n_layers + 120),
    )
    _write(fig, file, show)
    if file is not None and save_html and Path(file).suffix.lower() != ".html":
        _write(fig, Path(file).with_suffix(".html"), False)
    return fig


def plot_logit_lens_heatmap(
    probs: torch.Tensor,
    tokenizer,
    input_tokens: Sequence[str] | Sequence[int],
    k: int = 5,
    title: str | None = None,
    file: str | Path | None = None,
    width: int | None = None,
    height: int | None = None,
    show: bool = False,
):
    """Logit-lens heatmap: rows are layers, columns are input positions.

    Each cell shows the top-1 token predicted at that layer and position, coloured by its probability;
    hover lists the top-k tokens with their probabilities.

    Args:
        probs: `(layers, positions, vocab)` probabilities for one prompt.
        input_tokens: the `positions` input tokens, as strings or ids (ids are decoded).

    Example:
        >>> from unilens.testing import make_tokenizer
        >>> tok = make_tokenizer()
        >>> ids = tok("The capital of France").input_ids
        >>> probs = torch.randn(2, len(ids), 512).softmax(-1)  # (layers, positions, vocab)
        >>> fig = plot_logit_lens_heatmap(probs, tok, ids, k=3)
        >>> list(fig.layout.xaxis.ticktext)
        ['The', '␣capital', '␣of', '␣France']
    """
    go, _ = _plotly()
    probs = _as_probs(probs, "probs", (3,))
    n_layers, n_positions, vocab = probs.shape
    if len(input_tokens) != n_positions:
        raise ValueError(f"got {len(input_tokens)} input_tokens for {n_positions} positions; pass one per position")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    top_probs, top_ids = probs.topk(k, dim=-1)  # (layers, positions, k)
    ids, ps = top_ids.tolist(), top_probs.tolist()
    text = [[_plotly_text(token_label(tokenizer, ids[l][p][0])) for p in range(n_positions)] for l in range(n_layers)]
    hover = [
        [
            "<br>".join(f"{_plotly_text(token_label(tokenizer, i))}: {q:.4f}" for i, q in zip(ids[l][p], ps[l][p]))
            for p in range(n_positions)
        ]
        for l in range(n_layers)
    ]
    x_labels = [
        _plotly_text(token_label(tokenizer, t) if isinstance(t, int) else str(t)) for t in input_tokens
    ]
    fig = go.Figure(
        go.Heatmap(
            z=top_probs[..., 0].tolist(),  # (layers, positions)
            x=list(range(n_positions)),
            y=list(range(n_layers)),
            text=text,
            customdata=hover,
            texttemplate="%{text}",
            hovertemplate=f"layer %{{y}}, position %{{x}}<br>top-{k}:<br>%{{customdata}}<extra></extra>",
            colorscale="Blues",
            zmin=0.0,
            zmax=float(top_probs[..., 0].max()),
            colorbar={"title": {"text": "top-1 p"}},
        )
    )
    fig.update_xaxes(title_text="input token", tickmode="array", tickvals=list(range(n_positions)), ticktext=x_labels)
    fig.update_yaxes(title_text="layer")
    fig.update_layout(
        title=title,
        width=width or max(500, 70 * n_positions + 200),
        height=height or max(300, 26 * n_layers + 140),
    )
    _write(fig, file, show)
    return fig


def plot_patching_heatmap(
    results: torch.Tensor,
    x_labels: Sequence[str] | None = None,
    title: str | None = None,
    y_labels: Sequence[str] | None = None,
    x_title: str = "position",
    y_title: str = "layer",
    file: str | Path | None = None,
    show: bool = False,
):
    """Heatmap of patching results `(layers, positions)` or `(layers, heads)`, diverging colours centred on 0.

    Example:
        >>> effects = torch.tensor([[0.1, -0.2, 0.9], [0.0, 0.3, 0.5]])  # (layers, positions)
        >>> fig = plot_patching_heatmap(effects, x_labels=["The", " cat", " sat"], title="logit diff recovered")
        >>> fig.data[0].zmid
        0.0
    """
    go, _ = _plotly()
    values = torch.as_tensor(results).detach().to("cpu", torch.float32)
    if values.ndim != 2:
        raise ValueError(f"results must be 2-D (layers, positions) or (layers, heads), got shape {tuple(values.shape)}")
    n_rows, n_cols = values.shape
    if x_labels is not None and len(x_labels) != n_cols:
        raise ValueError(f"got {len(x_labels)} x_labels for {n_cols} columns")
    if y_labels is not None and len(y_labels) != n_rows:
        raise ValueError(f"got {len(y_labels)} y_labels for {n_rows} rows")
    finite = values[torch.isfinite(values)]
    bound = float(finite.abs().max()) if finite.numel() else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=values.tolist(),
            x=list(range(n_cols)),
            y=list(range(n_rows)),
            colorscale="RdBu",
            reversescale=True,  # positive effects red, negative blue
            zmid=0.0,
            zmin=-bound,
            zmax=bound,
            texttemplate="%{z:.2f}" if n_rows * n_cols <= 400 else None,
            hovertemplate=f"{y_title} %{{y}}, {x_title} %{{x}}<br>value %{{z:.4f}}<extra></extra>",
        )
    )
    xaxis: dict[str, Any] = {"title_text": x_title}
    if x_labels is not None:
        xaxis.update(tickmode="array", tickvals=list(range(n_cols)), ticktext=[_plotly_text(str(s)) for s in x_labels])
    yaxis: dict[str, Any] = {"title_text": y_title}
    if y_labels is not None:
        yaxis.update(tickmode="array", tickvals=list(range(n_rows)), ticktext=[_plotly_text(str(s)) for s in y_labels])
    fig.update_xaxes(**xaxis)
    fig.update_yaxes(**yaxis)
    fig.update_layout(title=title)
    _write(fig, file, show)
    return fig


# ------------------------------------------------------------------------------------------
# Attention viewer (self-contained HTML, vanilla JS, no network)
# ------------------------------------------------------------------------------------------

# Colour of an attention weight v in [0, 1]: white -> (8, 48, 107), per channel c: 255 - v * (255 - c).
# Rows other than the hovered query are faded: c + FADE * (255 - c).
_VIEWER_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 8px 0; }
#controls { margin-bottom: 8px; }
#info { margin-left: 16px; color: #555; font-family: monospace; }
.tokens { display: flex; flex-wrap: wrap; gap: 3px; margin: 8px 0 12px 0; max-width: 1200px; }
.token { font-family: monospace; white-space: pre; padding: 2px 4px; border: 1px solid #ccc; border-radius: 3px;
         cursor: default; background: #fff; }
.token.query { outline: 2px solid #d62728; }
.heads { display: flex; flex-wrap: wrap; gap: 16px; }
.head { display: flex; flex-direction: column; align-items: center; font-size: 12px; }
.head canvas { border: 1px solid #999; image-rendering: pixelated; display: block; }
.grid { display: grid; grid-template-columns: auto auto; grid-template-rows: auto auto; }
.corner { font-size: 10px; color: #777; display: flex; flex-direction: column; justify-content: flex-end;
          align-items: flex-end; padding: 0 4px 2px 0; }
.klabels, .qlabels { position: relative; }
.klabels div, .qlabels div { position: absolute; font-family: monospace; white-space: pre; color: #333;
                             overflow: hidden; text-overflow: ellipsis; }
.klabels div { writing-mode: vertical-rl; transform: rotate(180deg); bottom: 3px; }
.qlabels div { right: 4px; text-align: right; }
.scale { display: inline-flex; align-items: center; gap: 4px; margin-left: 16px; font-size: 12px; color: #555; }
.scale .bar { display: inline-block; width: 160px; height: 12px; border: 1px solid #999;
              background: linear-gradient(to right, rgb(255,255,255), rgb(8,48,107)); }
"""

_VIEWER_JS = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("unilens-attention-data").textContent);
  var tokens = data.tokens, n = tokens.length;
  var BASE = [8, 48, 107], FADE = 0.75;
  var CELL = Math.max(4, Math.min(24, Math.floor(360 / Math.max(n, 1))));
  var layerPos = 0, query = null;
  var select = document.getElementById("layer-select");
  var headsDiv = document.getElementById("heads");
  var tokensDiv = document.getElementById("tokens");
  var info = document.getElementById("info");

  function colour(v, faded) {
    v = Math.min(1, Math.max(0, v));
    var c = BASE.map(function (b) {
      var x = 255 - v * (255 - b);
      if (faded) { x = x + FADE * (255 - x); }
      return Math.round(x);
    });
    return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
  }

  function display(t) { return t.replace(/\\n/g, "\\\\n").replace(/\\t/g, "\\\\t"); }

  function drawHead(canvas, matrix) {
    var ctx = canvas.getContext("2d");
    for (var q = 0; q < n; q++) {
      for (var k = 0; k < n; k++) {
        ctx.fillStyle = colour(matrix[q * n + k], query !== null && q !== query);
        ctx.fillRect(k * CELL, q * CELL, CELL, CELL);
      }
    }
  }

  function drawAll() {
    var layer = data.layers[layerPos];
    var canvases = headsDiv.querySelectorAll("canvas");
    for (var h = 0; h < canvases.length; h++) {
      drawHead(canvases[h], layer.heads[h]);
      canvases[h].closest(".head").setAttribute("data-query", query === null ? "" : String(query));
    }
    var spans = tokensDiv.querySelectorAll(".token");
    for (var i = 0; i < spans.length; i++) {
      spans[i].classList.toggle("query", i === query);
      if (query === null) { spans[i].style.background = ""; continue; }
      var mean = 0;  // mean over heads of attention from the hovered query to key i
      for (var hh = 0; hh < layer.heads.length; hh++) { mean += layer.heads[hh][query * n + i]; }
      spans[i].style.background = i > query && mean === 0 ? "#eee" : colour(mean / layer.heads.length, false);
      spans[i].style.color = mean / layer.heads.length > 0.5 ? "#fff" : "";
    }
  }

  // axis labels, each centred on its row / column of cells; where cells are smaller than the text, every
  // STEP-th token. The label band is as deep as the longest label (monospace: ~0.62 em a character), at most 84 px.
  var FONT = Math.max(8, Math.min(11, CELL - 1)), STEP = Math.max(1, Math.ceil((FONT + 1) / CELL));
  var LONGEST = tokens.reduce(function (m, t) { return Math.max(m, display(t).length); }, 1);
  var DEPTH = Math.min(84, Math.ceil(FONT * 0.62 * LONGEST) + 8);

  function axisLabels(className, vertical) {
    var axis = document.createElement("div");
    axis.className = className;
    axis.style[vertical ? "height" : "width"] = DEPTH + "px";
    axis.style[vertical ? "width" : "height"] = n * CELL + "px";
    tokens.forEach(function (t, i) {
      if (i % STEP !== 0) { return; }
      var label = document.createElement("div");
      label.setAttribute("data-index", String(i));
      label.textContent = display(t);
      label.title = i + ": " + display(t);
      label.style.fontSize = FONT + "px";
      label.style.lineHeight = FONT + "px";
      label.style[vertical ? "left" : "top"] = (1 + i * CELL + (CELL - FONT) / 2) + "px";  // 1: the canvas border
      label.style[vertical ? "width" : "height"] = FONT + "px";
      label.style[vertical ? "maxHeight" : "maxWidth"] = (DEPTH - 6) + "px";
      axis.appendChild(label);
    });
    return axis;
  }

  function renderLayer() {
    var layer = data.layers[layerPos];
    headsDiv.textContent = "";
    layer.heads.forEach(function (matrix, h) {
      var box = document.createElement("div");
      box.className = "head";
      box.setAttribute("data-head", layer.index + "." + h);
      box.setAttribute("data-query", "");
      var label = document.createElement("div");
      label.textContent = "L" + layer.index + " H" + h;
      var grid = document.createElement("div");
      grid.className = "grid";
      var corner = document.createElement("div");
      corner.className = "corner";
      corner.innerHTML = "<span>key &rarr;</span><span>query &darr;</span>";
      var canvas = document.createElement("canvas");
      canvas.width = n * CELL;
      canvas.height = n * CELL;
      canvas.addEventListener("mousemove", function (ev) {
        var r = canvas.getBoundingClientRect();
        var k = Math.floor((ev.clientX - r.left) / r.width * n), q = Math.floor((ev.clientY - r.top) / r.height * n);
        if (q >= 0 && q < n && k >= 0 && k < n) {
          info.textContent = "L" + layer.index + " H" + h + ": " + display(tokens[q]) + " (" + q + ") -> " +
            display(tokens[k]) + " (" + k + ") = " + matrix[q * n + k].toFixed(4);
        }
      });
      grid.appendChild(corner);
      grid.appendChild(axisLabels("klabels", true));
      grid.appendChild(axisLabels("qlabels", false));
      grid.appendChild(canvas);
      box.appendChild(label);
      box.appendChild(grid);
      headsDiv.appendChild(box);
    });
    drawAll();
  }

  data.layers.forEach(function (layer, i) {
    var opt = document.createElement("option");
    opt.value = String(i);
    opt.textContent = "layer " + layer.index + " (" + layer.heads.length + " heads)";
    select.appendChild(opt);
  });
  select.addEventListener("change", function () { layerPos = Number(select.value); renderLayer(); });

  tokens.forEach(function (t, i) {
    var span = document.createElement("span");
    span.className = "token";
    span.setAttribute("data-index", String(i));
    span.textContent = display(t);
    span.title = i + ": " + display(t);
    span.addEventListener("mouseenter", function () { query = i; info.textContent = "query " + i + ": " + display(t); drawAll(); });
    tokensDiv.appendChild(span);
  });
  tokensDiv.addEventListener("mouseleave", function () { query = null; drawAll(); });

  renderLayer();
  document.body.setAttribute("data-ready", "1");
})();
"""


def _attention_layers(attention: torch.Tensor | Mapping[int, torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """`[(layer_index, (heads, query, key) float32 CPU tensor)]` from a 4-D tensor or a dict."""
    if isinstance(attention, Mapping):
        items = sorted(attention.items())
    else:
        attention = torch.as_tensor(attention)
        if attention.ndim == 5:
            raise ValueError(
                f"attention has shape {tuple(attention.shape)} (with a batch axis?); pass one prompt: "
                "(layers, heads, query, key), e.g. attention[:, 0]"
            )
        if attention.ndim != 4:
            raise ValueError(f"attention must be (layers, heads, query, key), got shape {tuple(attention.shape)}")
        items = list(enumerate(attention))
    if not items:
        raise ValueError("attention is empty; give at least one layer")
    out = []
    for index, value in items:
        value = torch.as_tensor(value).detach().to("cpu", torch.float32)
        if value.ndim != 3:
            raise ValueError(f"layer {index}: attention must be (heads, query, key), got shape {tuple(value.shape)}")
        out.append((int(index), value))
    return out


def attention_viewer_html(
    attention: torch.Tensor | Mapping[int, torch.Tensor],
    tokens: Sequence[str],
    path: str | Path | None = None,
    title: str = "unilens attention viewer",
) -> str:
    """A self-contained HTML page showing attention patterns: one small heatmap per head (query rows, key columns,
    each axis labelled with the tokens; every few tokens when the cells are too small for text), a colour scale
    (weight 0 white to 1 dark blue), a layer selector, and a token strip; hovering a token highlights its query row
    in every head and colours the strip by the mean attention (over heads) from that token.

    No network is needed to view it: CSS and vanilla JS are inline and the data is embedded as JSON
    (values rounded to 4 decimals). Each head element carries `data-head="LAYER.HEAD"`.

    Args:
        attention: `(layers, heads, query, key)` probabilities, or a dict `layer -> (heads, query, key)`
            (e.g. only the layers that have attention).
        tokens: one string per position (`query == key == len(tokens)`).
        path: where to write the HTML file (UTF-8), if given.

    Returns:
        the HTML text.

    Example:
        >>> scores = torch.randn(2, 4, 3, 3).masked_fill(torch.ones(3, 3).triu(1).bool(), float("-inf"))
        >>> attention = scores.softmax(-1)  # (layers, heads, query, key), e.g. model.attention_probabilities[i][0]
        >>> page = attention_viewer_html(attention, ["The", " cat", " sat"])
        >>> page.startswith("<!DOCTYPE html>"), "https://" in page
        (True, False)
    """
    tokens = [str(t) for t in tokens]
    layers = _attention_layers(attention)
    n = len(tokens)
    payload_layers = []
    for index, value in layers:
        heads, n_query, n_key = value.shape
        if n_query != n or n_key != n:
            raise ValueError(
                f"layer {index}: attention is (heads={heads}, query={n_query}, key={n_key}) but there are "
                f"{n} tokens; pass one token per position of a full (not cached) forward"
            )
        if not torch.isfinite(value).all() or value.min() < -1e-4 or value.max() > 1 + 1e-4:
            raise ValueError(
                f"layer {index}: attention values must be probabilities in [0, 1] (got min "
                f"{value.min().item():.4g}, max {value.max().item():.4g}); pass attention_probabilities, not scores"
            )
        rounded = (value.clamp(0, 1).double() * 1e4).round() / 1e4  # (heads, query, key)
        payload_layers.append({"index": index, "heads": [h.flatten().tolist() for h in rounded]})
    payload = json.dumps({"tokens": tokens, "layers": payload_layers}, ensure_ascii=False, separators=(",", ":"))
    # Inside <script>, "</script>" or "<!--" in a token would end the block: escape <, >, & in JSON strings.
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    safe_title = html.escape(title)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{safe_title}</title>
<style>{_VIEWER_CSS}</style>
</head>
<body>
<h1>{safe_title}</h1>
<div id="controls"><label>Layer <select id="layer-select"></select></label><span class="scale" id="scale">attention weight <span>0</span><span class="bar"></span><span>1</span></span><span id="info">hover a token to see what it attends to</span></div>
<div id="tokens" class="tokens"></div>
<div id="heads" class="heads"></div>
<script type="application/json" id="unilens-attention-data">{payload}</script>
<script>{_VIEWER_JS}</script>
</body>
</html>
"""
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page
