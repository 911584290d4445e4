"""`moeflow.dataflow.render`: DOT and HTML pictures of compiled graphs, checked by parsing
what they write against the graph they were drawn from."""

from __future__ import annotations

import ast
import itertools
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from moeflow.dataflow import (
    Attention,
    Combine,
    Cut,
    Edge,
    Embed,
    Expert,
    Gate,
    Graph,
    LMHead,
    Node,
    Placement,
    SeqChunk,
    Transfer,
    Unit,
    compile,
    render,
)
from moeflow.models.families import spec_from_config
from moeflow.models.tiny import TinyShape, tiny_config

SVG = "{http://www.w3.org/2000/svg}"
TWO = ("cpu:0", "cpu:1")


def compiled(family: str, devices: tuple[str, ...] = TWO, cut: Cut = Cut(),
             shape: TinyShape = TinyShape()) -> Graph:
    spec = spec_from_config(tiny_config(family, shape))
    unit = Unit(tuple(SeqChunk(i, 0, 5 - i, d) for i, d in enumerate(devices)))
    return compile(spec, unit, Placement.sharded(devices, spec.moe.num_experts), cut)


GRAPHS = {
    "qwen3_moe": compiled("qwen3_moe"),
    "deepseek_v2": compiled("deepseek_v2"),  # dense layer 0, shared experts in layer 1
    "qwen2_moe": compiled("qwen2_moe"),
    "qwen3_moe-barrier": compiled("qwen3_moe", cut=Cut(barrier=True)),
    "qwen2_moe-4dev-2stage": compiled("qwen2_moe", tuple(f"cuda:{i}" for i in range(4)),
                                      Cut(expert_stages=2), TinyShape(experts=16)),
}
CASES = [(name, layers) for name in GRAPHS for layers in (None, [0], [1])]


def selected(graph: Graph, layers: list[int] | None) -> list[Node]:
    """The model of selection: a layer's nodes; Embed with layer 0; LMHead with the last."""
    if layers is None:
        return list(graph.nodes)
    return [n for n in graph.nodes
            if (isinstance(n, Embed) and 0 in layers)
            or (isinstance(n, LMHead) and graph.num_layers - 1 in layers)
            or getattr(n, "layer", None) in layers]


def selected_edges(graph: Graph, layers: list[int] | None) -> list[Edge]:
    ids = {n.id for n in selected(graph, layers)}
    return [e for e in graph.edges if e.src in ids and e.dst in ids]


def device_of(node: Node) -> str:
    return node.src if isinstance(node, Transfer) else node.device


def svg_root(page: str) -> ET.Element:
    match = re.search(r"<svg .*?</svg>", page, re.S)
    assert match is not None
    return ET.fromstring(match.group(0))


def node_rects(root: ET.Element) -> dict[int, tuple[float, float, float, float]]:
    rects = {}
    for g in root.iter(f"{SVG}g"):
        if g.get("class", "").split()[:1] == ["node"]:
            rect = g.find(f"{SVG}rect")
            assert rect is not None
            x, y, w, h = (float(rect.get(k, "nan")) for k in ("x", "y", "width", "height"))
            rects[int(g.get("id", "")[1:])] = (x, y, w, h)
    return rects


def strip_dot_strings(dot: str) -> str:
    """DOT text with every well-formed quoted string removed."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', "", dot)


# -- DOT -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,layers", CASES)
def test_dot_has_a_cluster_per_device_and_every_selected_node_and_edge(
        name: str, layers: list[int] | None) -> None:
    graph = GRAPHS[name]
    dot = render.to_dot(graph, layers)
    nodes = selected(graph, layers)

    devices = {n.device for n in nodes if not isinstance(n, Transfer)}
    assert len(re.findall(r"subgraph cluster_\w+ \{", dot)) == len(devices)
    for device in devices:
        assert re.search(r'label="' + re.escape(device) + r'(\\n[^"]*)?";', dot)
    statements = re.findall(r"^\s*n(\d+) \[", dot, re.M)
    assert sorted(map(int, statements)) == [n.id for n in nodes]
    styles = {"data": "solid", "war": "dashed", "control": "dotted"}
    drawn = re.findall(r"^\s*n(\d+) -> n(\d+) \[style=(\w+)", dot, re.M)
    assert sorted((int(a), int(b), s) for a, b, s in drawn) == sorted(
        (e.src, e.dst, styles[e.kind]) for e in selected_edges(graph, layers))
    assert dot.count("{") == dot.count("}")


def test_dot_labels_name_kind_and_key_facts() -> None:
    dot = render.to_dot(GRAPHS["deepseek_v2"])
    for label in ("Attention L0", "Expert L0 dense", "Gate L1", "Expert L1 e0-3",
                  "Expert L1 shared", "Transfer dispatch cpu:0→cpu:1",
                  "Transfer combine cpu:1→cpu:0", "Combine L1", "Embed", "LMHead"):
        assert f'label="{label}\\n' in dot, label


def test_layer_selection_keeps_embed_with_layer_0_and_lm_head_with_the_last() -> None:
    graph = GRAPHS["qwen3_moe"]
    first, last = render.to_dot(graph, [0]), render.to_dot(graph, [1])
    assert "L1" not in first and "Embed" in first and "LMHead" not in first
    assert set(re.findall(r'label="[^"\\]*L0', last)) == {'label="from L0'}
    assert "Embed\\n" not in last and "LMHead" in last
    # Layer 1's attention reads layer 0's combine: that edge shows as a stub.
    assert 'label="from L0"' in last and 'label="from L0"' not in first


def test_empty_selection_still_renders() -> None:
    graph = GRAPHS["qwen3_moe"]
    assert "->" not in render.to_dot(graph, [99])
    root = svg_root(render.to_html(graph, [99]))
    assert node_rects(root) == {}


# -- HTML ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,layers", CASES)
def test_html_svg_parses_with_a_titled_node_per_selected_node(
        name: str, layers: list[int] | None) -> None:
    graph = GRAPHS[name]
    page = render.to_html(graph, layers, title=name)
    root = svg_root(page)
    nodes = selected(graph, layers)
    titles = [t.text or "" for t in root.iter(f"{SVG}title")]
    assert sorted(titles) == sorted(repr(n) for n in nodes)
    assert sorted(node_rects(root)) == [n.id for n in nodes]
    edges = [p for p in root.iter(f"{SVG}path") if "edge" in p.get("class", "").split()]
    kinds = [p.get("class", "").split()[1] for p in edges]
    assert sorted(kinds) == sorted(e.kind for e in selected_edges(graph, layers))
    for path in edges:
        dashed = path.get("stroke-dasharray") is not None
        assert dashed == (path.get("class") != "edge data")


@pytest.mark.parametrize("name,layers", CASES)
def test_layout_has_no_overlapping_nodes_and_each_sits_in_its_device_band(
        name: str, layers: list[int] | None) -> None:
    graph = GRAPHS[name]
    root = svg_root(render.to_html(graph, layers))
    rects = node_rects(root)
    for (a, (ax, ay, aw, ah)), (b, (bx, by, bw, bh)) in itertools.combinations(
            rects.items(), 2):
        apart = ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay
        assert apart, f"nodes {a} and {b} overlap"
    bands = {}
    for g in root.iter(f"{SVG}g"):
        if g.get("class") == "band":
            rect, label = g.find(f"{SVG}rect"), g.find(f"{SVG}text")
            assert rect is not None and label is not None
            top = float(rect.get("y", "nan"))
            bands[label.text] = (top, top + float(rect.get("height", "nan")))
    width, height = float(root.get("width", "0")), float(root.get("height", "0"))
    for node_id, (x, y, w, h) in rects.items():
        top, bottom = bands[device_of(graph.nodes[node_id])]
        assert top <= y and y + h <= bottom and 0 <= x and x + w <= width <= 5000
    assert height <= 3000


def test_html_columns_follow_dependencies() -> None:
    graph = GRAPHS["qwen2_moe-4dev-2stage"]
    rects = node_rects(svg_root(render.to_html(graph, [1])))
    for e in selected_edges(graph, [1]):
        assert rects[e.src][0] + rects[e.src][2] < rects[e.dst][0]


def test_html_header_shows_sequences_and_placement_ranges() -> None:
    spec = spec_from_config(tiny_config("qwen3_moe"))
    unit = Unit((SeqChunk(7, 12, 5, "cpu:0"), SeqChunk(9, 0, 3, "cpu:1")))
    placement = Placement(TWO, (0, 0, 1, 0, 1, 1, 1, 0))
    page = render.to_html(compile(spec, unit, placement), [0], title="demo")
    assert "<h1>demo</h1>" in page
    assert "<tr><td>7</td><td>12</td><td>5</td><td>cpu:0</td>" in page
    assert "<td>cpu:0</td><td>0-1,3,7</td>" in page and "<td>cpu:1</td><td>2,4-6</td>" in page
    assert "Expert L0 e0-1,3,7" in page and "seq 9 · 3 tok" in page


def test_html_is_self_contained() -> None:
    page = render.to_html(GRAPHS["qwen3_moe"], [0])
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"]
    assert set(re.findall(r"url\(([^)]*)\)", page)) <= {"#arrow", "#arrow-x", "#arrow-stub"}


# -- escaping --------------------------------------------------------------------------

ODD_A, ODD_B = 'gpu<&>"a', "gpu\\b'</title>"


def odd_graph() -> Graph:
    """Hand-built: devices whose names need escaping, and war and control edges."""
    unit = Unit((SeqChunk(0, 0, 2, ODD_A),))
    nodes: tuple[Node, ...] = (
        Embed(0, ODD_A, (0,), 2), Attention(1, ODD_A, 0, (0,), 2, 2), Gate(2, ODD_A, 0, (0,), 2),
        Transfer(3, ODD_A, (ODD_B,), 0, "dispatch", 4096, (0,)), Expert(4, ODD_B, 0, (0,)),
        Transfer(5, ODD_B, (ODD_A,), 0, "combine", None, (0,)), Combine(6, ODD_A, 0, (0,), 2),
        LMHead(7, ODD_A, (0,), 1))
    edges = tuple(Edge(i, i + 1) for i in range(7)) + (
        Edge(1, 6), Edge(2, 6), Edge(0, 4, "war"), Edge(1, 3, "control"))
    return Graph(unit, Placement((ODD_A, ODD_B), (1,)), nodes, edges, num_layers=1)


def test_html_escapes_names_and_title() -> None:
    graph = odd_graph()
    page = render.to_html(graph, title="<b>&\"moe\"")
    assert "<b>" not in page and ODD_A not in page and "</title>'" not in page
    root = svg_root(page)  # parses only if every string was escaped
    texts = {t.text for t in root.iter(f"{SVG}text")}
    assert ODD_A in texts and f"Transfer dispatch {ODD_A}→{ODD_B}" in texts
    assert "L0 e0 · 4.0 KiB" in texts
    assert sorted(t.text or "" for t in root.iter(f"{SVG}title")) == sorted(map(repr, graph.nodes))
    header = page.split("<svg", 1)[0]
    assert "&lt;b&gt;&amp;&quot;moe&quot;" in header and "gpu&lt;&amp;&gt;&quot;a" in header


def test_dot_quotes_names_and_title() -> None:
    dot = render.to_dot(odd_graph(), title='say "hi" \\ bye')
    outside = strip_dot_strings(dot)
    assert '"' not in outside and "<" not in outside and "'" not in outside
    assert r'label="say \"hi\" \\ bye"' in dot
    assert r'label="gpu<&>\"a\nexperts none"' in dot
    assert "n0 -> n4 [style=dashed" in dot and "n1 -> n3 [style=dotted" in dot


# -- write and purity -----------------------------------------------------------------


@pytest.mark.parametrize("suffix,start", [(".dot", "digraph"), (".GV", "digraph"),
                                          (".html", "<!DOCTYPE html>"),
                                          (".htm", "<!DOCTYPE html>")])
def test_write_picks_the_format_by_suffix(tmp_path: Path, suffix: str, start: str) -> None:
    path = tmp_path / "deep" / "er" / f"graph{suffix}"
    render.write(GRAPHS["deepseek_v2"], path, layers=[0], title="t")
    assert path.read_text(encoding="utf-8").startswith(start)


def test_write_rejects_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.dot.*\.gv.*\.html.*\.htm"):
        render.write(GRAPHS["deepseek_v2"], tmp_path / "out" / "graph.png")
    assert not (tmp_path / "out").exists()


def test_render_imports_only_the_standard_library_and_the_graph() -> None:
    source = Path(render.__file__).read_text(encoding="utf-8")
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    outside = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names}
    assert outside == {"moeflow.dataflow.graph"}
    assert not {"asyncio", "zmq", "torch"} & {m.split(".")[0] for m in modules}
