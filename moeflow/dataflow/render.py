"""Pictures of a compiled `Graph`: Graphviz DOT text, or one self-contained HTML file.

Both draw the same thing: every node as a box coloured by its kind, grouped by the device
that runs it, and every dependency as an arrow (data solid, `war` dashed, `control`
dotted). A Transfer is drawn as a pink pill on its source device, and arrows that cross
from one device to another are pink too, so bytes moving between devices stand out.

    to_dot(graph)                  DOT, one `cluster` per device; lay it out with `dot -Tsvg`
    to_html(graph, layers=[0])     an inline SVG laid out here, no scripts and no network:
                                   columns are longest-path depth, one band per device
    write(graph, "g.html")         picks the format by suffix

`layers` keeps the nodes of those layers (Embed with layer 0, LMHead with the last layer)
and the edges among them; an edge from a node left out shows as a stub "from L<n>".
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moeflow.dataflow.graph import (
    Attention,
    Edge,
    Embed,
    Expert,
    Graph,
    LMHead,
    Node,
    Transfer,
    Unit,
)

# Fill colours by node kind, shared by DOT, HTML and the legend.
KIND_FILLS: dict[str, str] = {
    "Embed": "#e0e0e0", "Attention": "#9ecae1", "Gate": "#fdd0a2", "Expert": "#a1d99b",
    "Expert shared/dense": "#d9f0d3", "Transfer": "#fbb4d9", "Combine": "#cbc9e2",
    "LMHead": "#c8c8c8",
}
CROSS_COLOUR = "#c51b7d"  # Transfer outlines and arrows that cross devices
EDGE_COLOUR = "#666666"
DOT_EDGE_STYLES: dict[str, str] = {"data": "solid", "war": "dashed", "control": "dotted"}
SVG_EDGE_DASHES: dict[str, str] = {"data": "", "war": "6 4", "control": "1.5 3"}
FORMATS = (".dot", ".gv", ".html", ".htm")


def to_dot(graph: Graph, layers: Sequence[int] | None = None, title: str = "") -> str:
    """DOT text for the selected `layers` of `graph` (all when None)."""
    sel = _select(graph, layers)
    lines = ["digraph moeflow {",
             f"  graph [rankdir=LR, fontname=Helvetica, labelloc=t, label={_q(title)}];",
             '  node [fontname=Helvetica, fontsize=10, shape=box, style="filled,rounded"];',
             f'  edge [color="{EDGE_COLOUR}"];']
    devices = _devices(graph, sel.nodes)
    for index, device in enumerate(devices):
        label = f"{device}\nexperts {_owned(graph, device) or 'none'}"
        lines.append(f"  subgraph cluster_{index} {{")
        lines.append(f'    label={_q(label)}; style=filled; fillcolor="{_band_tint(index)}"; '
                     'color="#b0b8c4";')
        lines += [f"    {_dot_node(graph.unit, n)}" for n in sel.nodes
                  if not isinstance(n, Transfer) and n.device == device]
        lines.append("  }")
    # Transfers sit outside every cluster, so Graphviz draws them between devices.
    lines += [f"  {_dot_node(graph.unit, n)}" for n in sel.nodes if isinstance(n, Transfer)]
    for e in sel.edges:
        crosses = _device(graph.nodes[e.src]) != _device(graph.nodes[e.dst])
        colour = f', color="{CROSS_COLOUR}"' if crosses else ""
        lines.append(f"  n{e.src} -> n{e.dst} [style={DOT_EDGE_STYLES[e.kind]}{colour}];")
    for node_id, origins in sel.stubs.items():
        lines.append(f"  stub{node_id} [shape=plaintext, style=solid, "
                     f"label={_q('from ' + ','.join(origins))}];")
        lines.append(f"  stub{node_id} -> n{node_id} [style=dashed, color=\"#aaaaaa\"];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_html(graph: Graph, layers: Sequence[int] | None = None, title: str = "") -> str:
    """A self-contained HTML page: header, legend, and an inline SVG of the selection."""
    sel = _select(graph, layers)
    layout = _layout(graph, sel)
    heading = title or "moeflow dataflow graph"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_x(heading)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"{_header(graph, sel, layers, heading)}\n"
            f'<div class="canvas">\n{_svg(graph, sel, layout)}\n</div>\n</body>\n</html>\n')


def write(graph: Graph, path: str | os.PathLike[str], layers: Sequence[int] | None = None,
          title: str = "") -> None:
    """Write DOT (`.dot`, `.gv`) or HTML (`.html`, `.htm`) to `path`, making its folder."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell which picture to write for {str(path)!r}: "
                         f"the suffix must be one of {', '.join(FORMATS)}")
    text = (to_dot(graph, layers, title) if suffix in (".dot", ".gv")
            else to_html(graph, layers, title))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# -- selection and labels --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Selection:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    stubs: dict[int, tuple[str, ...]]  # node id -> where its dropped inputs come from


def _select(graph: Graph, layers: Sequence[int] | None) -> _Selection:
    if layers is None:
        return _Selection(graph.nodes, graph.edges, {})
    wanted = set(layers)

    def keep(node: Node) -> bool:
        if isinstance(node, Embed):
            return 0 in wanted
        if isinstance(node, LMHead):
            return graph.num_layers - 1 in wanted
        return node.layer in wanted

    kept = {n.id for n in graph.nodes if keep(n)}
    stubs: dict[int, list[str]] = {}
    for e in graph.edges:
        if e.dst in kept and e.src not in kept:
            origin = _origin(graph.nodes[e.src])
            if origin not in stubs.setdefault(e.dst, []):
                stubs[e.dst].append(origin)
    return _Selection(tuple(graph.nodes[i] for i in sorted(kept)),
                      tuple(e for e in graph.edges if e.src in kept and e.dst in kept),
                      {i: tuple(o) for i, o in stubs.items()})


def _origin(node: Node) -> str:
    if isinstance(node, (Embed, LMHead)):
        return type(node).__name__
    return f"L{node.layer}"


def _device(node: Node) -> str:
    return node.src if isinstance(node, Transfer) else node.device


def _devices(graph: Graph, nodes: Iterable[Node]) -> tuple[str, ...]:
    """Devices with a selected node (or a Transfer's destination), placement order first."""
    used = {d for n in nodes for d in ((n.src, *n.dsts) if isinstance(n, Transfer)
                                       else (n.device,))}
    order = dict.fromkeys(graph.placement.devices + graph.devices())
    return tuple(d for d in order if d in used)


def _owned(graph: Graph, device: str) -> str:
    """The experts `device` owns, as ranges; empty when it owns none."""
    if device not in graph.placement.devices:
        return ""
    return _ranges(graph.placement.experts_of(device))


def _ranges(ids: Iterable[int]) -> str:
    """(0, 1, 2, 3, 6) -> '0-3,6'."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _seq_ids(unit: Unit, seqs: tuple[int, ...]) -> str:
    # Node `seqs` index into unit.seqs; fall back to the index in a hand-built graph.
    return "seq " + _ranges(unit.seqs[i].seq_id if 0 <= i < len(unit.seqs) else i
                            for i in seqs)


def _num_bytes(num_bytes: int) -> str:
    size, unit = float(num_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{num_bytes} B" if unit == "B" else f"{size:.1f} {unit}"


def _label(unit: Unit, n: Node) -> tuple[str, str]:
    """The two lines drawn on a node: kind and layer, then its key facts."""
    if isinstance(n, Transfer):
        experts = f" e{_ranges(n.experts)}" if n.experts else ""
        stage = f" · stage {n.stage}" if n.stage else ""
        if n.part != (0, 1):
            stage += f" · slice {n.part[0] + 1}/{n.part[1]}"
        # A size known only after the gate (None) is left out.
        size = "" if n.num_bytes is None else f" · {_num_bytes(n.num_bytes)}"
        return (f"Transfer {n.payload} {n.src}→{','.join(n.dsts)}",
                f"L{n.layer}{experts}{stage}{size}")
    if isinstance(n, Expert):
        if n.kind == "routed":
            return (f"Expert L{n.layer} e{_ranges(n.experts)}",
                    f"{len(n.experts)} routed · stage {n.stage}")
        return f"Expert L{n.layer} {n.kind}", f"{n.num_tokens} tok"
    if isinstance(n, LMHead):
        rows = "row" if n.num_rows == 1 else "rows"
        return "LMHead", f"{_seq_ids(unit, n.seqs)} · {n.num_rows} {rows}"
    seqs = f"{_seq_ids(unit, n.seqs)} · {n.num_tokens} tok"
    if isinstance(n, Embed):
        return "Embed", seqs
    if isinstance(n, Attention):
        part = "" if n.part == "full" else f" {n.part}"
        return f"Attention L{n.layer}{part}", f"{seqs} · ctx {n.num_context}"
    return f"{type(n).__name__} L{n.layer}", seqs


def _fill(n: Node) -> str:
    if isinstance(n, Expert) and n.kind != "routed":
        return KIND_FILLS["Expert shared/dense"]
    return KIND_FILLS.get(type(n).__name__, "#ffffff")


def _band_tint(index: int) -> str:
    return ("#f6f8fb", "#eaeff5")[index % 2]


def _q(text: str) -> str:
    """A quoted DOT string; a newline in `text` becomes a line break."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _x(text: object) -> str:
    return html.escape(str(text), quote=True)


def _dot_node(unit: Unit, n: Node) -> str:
    shape = f', shape=cds, color="{CROSS_COLOUR}"' if isinstance(n, Transfer) else ""
    return (f"n{n.id} [label={_q(chr(10).join(_label(unit, n)))}, "
            f'fillcolor="{_fill(n)}", tooltip={_q(repr(n))}{shape}];')


# -- layout ----------------------------------------------------------------------------

CHAR_W, SMALL_CHAR_W = 6.6, 6.0  # monospace 11px and 10px advance widths
NODE_H, PAD_X, MIN_W = 36, 10, 90
COL_GAP, VGAP = 60, 10
CHANNEL, BAND_PAD = 26, 12  # band top strip for edges that skip columns; bottom padding
MARGIN = 12


@dataclass(frozen=True, slots=True)
class _Box:
    x: float
    y: float
    w: float
    h: float


@dataclass(frozen=True, slots=True)
class _Layout:
    boxes: dict[int, _Box]
    band_of: dict[int, int]  # node id -> band index
    depth: dict[int, int]  # node id -> column
    devices: tuple[str, ...]
    bands: tuple[tuple[float, float], ...]  # (top, height) per device
    width: float
    height: float


def _depths(graph: Graph, preds: dict[int, list[int]]) -> dict[int, int]:
    """Longest-path depth of each selected node (the keys of `preds`) within the selection."""
    depth: dict[int, int] = {}
    for i in graph.topological_order():
        if i in preds:
            depth[i] = max((depth[p] + 1 for p in preds[i]), default=0)
    return depth


def _layout(graph: Graph, sel: _Selection) -> _Layout:
    devices = _devices(graph, sel.nodes)
    band_of = {n.id: devices.index(_device(n)) for n in sel.nodes}
    preds: dict[int, list[int]] = {n.id: [] for n in sel.nodes}
    for e in sel.edges:
        preds[e.dst].append(e.src)
    depth = _depths(graph, preds)
    width = {n.id: max(MIN_W, max(len(a) * CHAR_W, len(b) * SMALL_CHAR_W) + 2 * PAD_X)
             for n in sel.nodes for a, b in [_label(graph.unit, n)]}
    num_cols = max(depth.values(), default=-1) + 1
    cells: dict[tuple[int, int], list[int]] = {}
    for n in sel.nodes:
        cells.setdefault((depth[n.id], band_of[n.id]), []).append(n.id)

    stack = {key: len(ids) * NODE_H + (len(ids) - 1) * VGAP for key, ids in cells.items()}
    bands: list[tuple[float, float]] = []
    top = float(MARGIN)
    for b in range(len(devices)):
        inner = max((h for (_, band), h in stack.items() if band == b), default=NODE_H)
        bands.append((top, CHANNEL + inner + BAND_PAD))
        top += CHANNEL + inner + BAND_PAD
    gutter = max([110.0] + [len(d) * 7.5 + 24 for d in devices])
    col_w = [max(width[i] for (d, _), ids in cells.items() if d == c for i in ids)
             for c in range(num_cols)]
    col_x = [gutter + COL_GAP + sum(col_w[:c]) + c * COL_GAP for c in range(num_cols)]
    boxes: dict[int, _Box] = {}

    def order_key(i: int) -> tuple[float, float, int]:
        # Barycentre of the inputs already placed keeps edges short and uncrossed.
        ys = [boxes[p].y + NODE_H / 2 for p in preds[i]]
        node = graph.nodes[i]
        hint = devices.index(node.dsts[0]) if isinstance(node, Transfer) else band_of[i]
        return (sum(ys) / len(ys) if ys else 0.0, hint, i)

    for (c, b), ids in sorted(cells.items()):
        band_top, band_h = bands[b]
        y = band_top + CHANNEL + (band_h - CHANNEL - BAND_PAD - stack[c, b]) / 2
        for i in sorted(ids, key=order_key):
            boxes[i] = _Box(col_x[c] + (col_w[c] - width[i]) / 2, y, width[i], NODE_H)
            y += NODE_H + VGAP
    total_w = (col_x[-1] + col_w[-1] if num_cols else gutter) + MARGIN + 20
    return _Layout(boxes, band_of, depth, devices, tuple(bands), total_w, top + MARGIN)


# -- svg and page ----------------------------------------------------------------------


def _svg(graph: Graph, sel: _Selection, layout: _Layout) -> str:
    w, h = layout.width, layout.height
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
           f'viewBox="0 0 {w:.0f} {h:.0f}" font-family="{_MONO}">',
           "<defs>" + "".join(
               f'<marker id="{name}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
               f'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" '
               f'fill="{colour}"/></marker>'
               for name, colour in (("arrow", EDGE_COLOUR), ("arrow-x", CROSS_COLOUR),
                                    ("arrow-stub", "#aaaaaa"))) + "</defs>"]
    for b, (device, (top, height)) in enumerate(zip(layout.devices, layout.bands)):
        owned = _owned(graph, device)
        out.append(f'<g class="band"><rect x="0" y="{top:.1f}" width="{w:.0f}" '
                   f'height="{height:.1f}" fill="{_band_tint(b)}"/>'
                   f'<text x="{MARGIN}" y="{top + height / 2:.1f}" font-size="13" '
                   f'font-weight="bold" fill="#333">{_x(device)}</text>'
                   f'<text x="{MARGIN}" y="{top + height / 2 + 16:.1f}" font-size="10" '
                   f'fill="#666">experts {_x(owned or "none")}</text></g>')
    channel_uses = [0] * len(layout.devices)
    for e in sel.edges:
        out.append(_edge(e, layout, channel_uses))
    for node_id, origins in sel.stubs.items():
        box = layout.boxes[node_id]
        cy = box.y + box.h / 2
        out.append(f'<g class="stub"><path d="M{box.x - 34:.1f},{cy:.1f} H{box.x:.1f}" '
                   'stroke="#aaaaaa" stroke-dasharray="4 3" fill="none" '
                   'marker-end="url(#arrow-stub)"/>'
                   f'<text x="{box.x - 4:.1f}" y="{cy - 5:.1f}" font-size="9" fill="#888" '
                   f'text-anchor="end">{_x("from " + ",".join(origins))}</text></g>')
    for n in sel.nodes:
        out.append(_svg_node(graph.unit, n, layout.boxes[n.id]))
    out.append("</svg>")
    return "\n".join(out)


def _edge(e: Edge, layout: _Layout, channel_uses: list[int]) -> str:
    a, b = layout.boxes[e.src], layout.boxes[e.dst]
    x1, y1, x2, y2 = a.x + a.w, a.y + a.h / 2, b.x, b.y + b.h / 2
    band = layout.band_of[e.src]
    crosses = band != layout.band_of[e.dst]
    if not crosses and layout.depth[e.dst] - layout.depth[e.src] > 1:
        # It skips columns: run along the band's top strip instead of through boxes.
        cy = layout.bands[band][0] + 6 + 4 * (channel_uses[band] % 5)
        channel_uses[band] += 1
        r = 16
        d = (f"M{x1:.1f},{y1:.1f} C{x1 + r:.1f},{y1:.1f} {x1 + r:.1f},{cy:.1f} "
             f"{x1 + 2 * r:.1f},{cy:.1f} H{x2 - 2 * r:.1f} C{x2 - r:.1f},{cy:.1f} "
             f"{x2 - r:.1f},{y2:.1f} {x2:.1f},{y2:.1f}")
    else:
        dx = (x2 - x1) / 2
        d = f"M{x1:.1f},{y1:.1f} C{x1 + dx:.1f},{y1:.1f} {x2 - dx:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
    colour, marker = (CROSS_COLOUR, "arrow-x") if crosses else (EDGE_COLOUR, "arrow")
    dash = SVG_EDGE_DASHES[e.kind]
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<path class="edge {e.kind}" d="{d}" fill="none" stroke="{colour}" '
            f'stroke-width="1.3"{dash_attr} marker-end="url(#{marker})"/>')


def _svg_node(unit: Unit, n: Node, box: _Box) -> str:
    transfer = isinstance(n, Transfer)
    rx = box.h / 2 if transfer else 5
    stroke = CROSS_COLOUR if transfer else "#555555"
    head, detail = _label(unit, n)
    cx = box.x + box.w / 2
    return (f'<g class="node {type(n).__name__}" id="n{n.id}"><title>{_x(repr(n))}</title>'
            f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" height="{box.h:.1f}" '
            f'rx="{rx:.1f}" fill="{_fill(n)}" stroke="{stroke}"/>'
            f'<text x="{cx:.1f}" y="{box.y + 15:.1f}" font-size="11" font-weight="bold" '
            f'text-anchor="middle">{_x(head)}</text>'
            f'<text x="{cx:.1f}" y="{box.y + 29:.1f}" font-size="10" fill="#444" '
            f'text-anchor="middle">{_x(detail)}</text></g>')


def _header(graph: Graph, sel: _Selection, layers: Sequence[int] | None, heading: str) -> str:
    shown = "all layers" if layers is None else f"layers {_ranges(layers) or 'none'}"
    seq_rows = "".join(f"<tr><td>{s.seq_id}</td><td>{s.start}</td><td>{s.num_tokens}</td>"
                       f"<td>{_x(s.home)}</td><td>{_x(s.logits)}</td></tr>"
                       for s in graph.unit.seqs)
    owner_rows = "".join(f"<tr><td>{_x(d)}</td>"
                         f"<td>{_x(_owned(graph, d) or '-')}</td></tr>"
                         for d in graph.placement.devices)
    swatches = "".join(
        f'<span class="key"><span class="swatch{" pill" if name == "Transfer" else ""}" '
        f'style="background:{fill}"></span>{_x(name)}</span>'
        for name, fill in KIND_FILLS.items())
    lines = "".join(f'<span class="key"><span class="line" style="border-top:2px {style} '
                    f'{EDGE_COLOUR}"></span>{kind}</span>'
                    for kind, style in DOT_EDGE_STYLES.items())
    lines += (f'<span class="key"><span class="line" style="border-top:2px solid '
              f'{CROSS_COLOUR}"></span>crosses devices</span>')
    return (f"<header><h1>{_x(heading)}</h1>"
            f'<p class="meta">{shown} of {graph.num_layers} · {len(sel.nodes)} nodes · '
            f"{len(sel.edges)} edges · hover a node for its full record</p>"
            f'<div class="facts"><table><caption>Sequences</caption><tr><th>seq</th>'
            f"<th>start</th><th>tokens</th><th>home</th><th>logits</th></tr>{seq_rows}</table>"
            f"<table><caption>Placement</caption><tr><th>device</th>"
            f"<th>experts (of {graph.placement.num_experts})</th></tr>{owner_rows}</table>"
            f'<div class="legend"><div>{swatches}</div><div>{lines}</div></div></div></header>')


_MONO = "ui-monospace, Menlo, Consolas, 'DejaVu Sans Mono', monospace"
_CSS = """
body { font-family: system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 4px; }
.meta { color: #666; margin: 0 0 10px; font-size: 13px; }
.facts { display: flex; gap: 28px; flex-wrap: wrap; font-size: 12px; margin-bottom: 12px; }
table { border-collapse: collapse; }
caption { text-align: left; font-weight: bold; padding-bottom: 3px; }
th, td { border: 1px solid #d0d7de; padding: 2px 8px; text-align: left; }
.legend div { margin-bottom: 6px; }
.key { display: inline-flex; align-items: center; margin-right: 14px; }
.swatch { width: 16px; height: 12px; border: 1px solid #555; border-radius: 3px;
          margin-right: 5px; }
.swatch.pill { border-radius: 6px; border-color: #c51b7d; }
.line { width: 28px; margin-right: 5px; }
.canvas { overflow: auto; border: 1px solid #d0d7de; width: fit-content; max-width: 100%; }
.node:hover rect { stroke-width: 2.5; }
"""
