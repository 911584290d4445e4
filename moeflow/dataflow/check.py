"""Is a graph a correct forward pass? Each node must read everything it depends on.

Executors guarantee that a node runs only after its predecessors *in the graph*; a graph
that leaves out a real dependency lets a node run before its data exists. `problems(graph,
spec)` lists every such gap in words, so a policy that cuts or re-wires the graph is
checked against what the model needs, whatever shape it chose:

    - every home chains Embed -> Attention(0) -> ... -> Combine(L-1) -> LMHead, each layer
      reading the previous one (a home may hold several such chains, one per micro-batch:
      a chain is the nodes of one `seqs`); an attention cut into pre -> core -> post reads
      through each part, the core perhaps on another device; a prefill part's keys and
      values reach one store part, where the sequences' cache is;
    - in an MoE layer, every routed expert appears in exactly one Expert node that reads a
      chain's Gate (directly on its own device, or through a dispatch Transfer from the
      home), on a device that owns it or that reads it as a weight page;
    - every home's Combine reads its Attention (residual), its Gate (row order), every expert
      group's output (directly, or through a combine Transfer to the home), and its shared
      expert when the model has one;
    - every Transfer reads a node on its source device and feeds nodes on its destination;
    - every node's inputs fill the roles its kind reads them in (`graph.input_roles`): say,
      a Combine reads one residual, and at most one Gate.
"""

from __future__ import annotations

from moeflow.dataflow.graph import (
    Attention, Combine, Embed, Expert, Gate, Graph, LMHead, Node, Transfer, input_role,
    input_roles,
)
from moeflow.models.spec import ModelSpec


class MalformedGraph(ValueError):
    pass


def problems(graph: Graph, spec: ModelSpec) -> list[str]:
    return _Checker(graph, spec).run()


def check(graph: Graph, spec: ModelSpec) -> None:
    found = problems(graph, spec)
    if found:
        more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
        raise MalformedGraph("; ".join(found[:5]) + more)


class _Checker:
    def __init__(self, graph: Graph, spec: ModelSpec) -> None:
        self.graph = graph
        self.spec = spec
        self.nodes = graph.nodes
        self.out: list[str] = []
        self.index: dict[tuple[type, int | None, str], list[Node]] = {}
        for n in graph.nodes:
            if not isinstance(n, Transfer):
                layer = getattr(n, "layer", None)
                self.index.setdefault((type(n), None, n.device), []).append(n)
                if layer is not None:
                    self.index.setdefault((type(n), layer, n.device), []).append(n)
        self.routed: dict[int, list[Expert]] = {}
        for n in graph.nodes:
            if isinstance(n, Expert) and n.kind == "routed":
                self.routed.setdefault(n.layer, []).append(n)

    def label(self, n: Node) -> str:
        where = f"{n.src}->{','.join(n.dsts)}" if isinstance(n, Transfer) else n.device
        layer = getattr(n, "layer", None)
        return f"{type(n).__name__}#{n.id}({'' if layer is None else f'L{layer} '}{where})"

    def reads(self, node: Node) -> list[Node]:
        return [self.nodes[i] for i in self.graph.inputs(node.id)]

    def sources(self, node: Node) -> list[Node]:
        """What `node` reads, seen through transfers: the nodes that produced the data."""
        return [self.origin(x) for x in self.reads(node)]

    def origin(self, n: Node) -> Node:
        for _ in range(len(self.nodes)):
            if not isinstance(n, Transfer):
                break
            ins = self.reads(n)
            if len(ins) != 1:
                break
            n = ins[0]
        return n

    def on(self, kind: type, layer: int | None, device: str) -> list[Node]:
        return self.index.get((kind, layer, device), [])

    def run(self) -> list[str]:
        self.devices_and_transfers()
        if self.out:
            return self.out
        for home in self.graph.unit.homes(self.graph.placement.devices):
            embeds = self.on(Embed, None, home)
            if not embeds:
                self.out.append(f"home {home} has no Embed")
            for embed in embeds:
                self.home_chain(home, embed.seqs)  # type: ignore[union-attr]
        self.roles()  # after the forward pass's own gaps, which say more
        return self.out

    def chain(self, kind: type, layer: int | None, device: str, seqs: tuple[int, ...]
              ) -> list[Node]:
        return [n for n in self.on(kind, layer, device) if n.seqs == seqs]  # type: ignore[union-attr]

    def roles(self) -> None:
        """Every node's inputs fill the roles its kind reads (`input_roles`), each as many
        times as it takes."""
        for n in self.nodes:
            arity = input_roles(n)
            filled: dict[str, int] = {}
            for p in self.graph.inputs(n.id):
                role = input_role(n, self.nodes[p])
                if role is None or role not in arity:
                    self.out.append(f"{self.label(n)} reads {self.label(self.nodes[p])}, an "
                                    f"input it has no role for")
                else:
                    filled[role] = filled.get(role, 0) + 1
            for role, (least, most) in arity.items():
                k = filled.get(role, 0)
                if k < least or (most is not None and k > most):
                    want = f"{least}" if least == most else \
                        f"at least {least}" if most is None else f"{least} to {most}"
                    self.out.append(f"{self.label(n)} reads {k} {role} input(s), takes {want}")

    def devices_and_transfers(self) -> None:
        devices = self.graph.placement.devices
        for n in self.nodes:
            for d in ((n.src, *n.dsts) if isinstance(n, Transfer) else (n.device,)):
                if d not in devices:
                    self.out.append(f"{self.label(n)} runs on {d}, not in the placement")
            if not isinstance(n, Transfer):
                continue
            for src in self.reads(n):
                if src.device != n.src and not (isinstance(src, Transfer)
                                                and n.src in src.dsts):
                    self.out.append(f"{self.label(n)} reads {self.label(src)}, not on {n.src}")
            for succ in self.graph.succs(n.id):
                dst = self.nodes[succ]
                if n.id in self.graph.inputs(succ) and getattr(dst, "device", None) \
                        not in n.dsts and not (isinstance(dst, Transfer) and dst.src in n.dsts):
                    self.out.append(f"{self.label(n)} feeds {self.label(dst)}, not on "
                                    f"{' or '.join(n.dsts)}")

    def home_chain(self, home: str, seqs: tuple[int, ...]) -> None:
        embeds, heads = self.chain(Embed, None, home, seqs), self.chain(LMHead, None, home, seqs)
        if len(embeds) != 1 or len(heads) != 1:
            self.out.append(f"home {home} sequences {seqs} need one Embed and one LMHead, "
                            f"have {len(embeds)} and {len(heads)}")
            return
        previous: Node = embeds[0]
        for layer, layer_spec in enumerate(self.spec.layers):
            attn = [a for a in self.graph.nodes if isinstance(a, Attention)
                    and a.layer == layer and a.seqs == seqs
                    and (a.device == home or a.part in ("core", "store"))]
            firsts = [a for a in attn if a.part in ("full", "pre", "prefill")
                      and a.device == home]
            lasts = [a for a in attn if a.part in ("full", "post", "prefill")
                     and a.device == home]
            combines = self.chain(Combine, layer, home, seqs)
            if len(firsts) != 1 or len(lasts) != 1 or len(combines) != 1:
                self.out.append(f"home {home} sequences {seqs} layer {layer}: expected one "
                                f"Attention and one Combine, found {len(firsts)} and "
                                f"{len(combines)}")
                return
            first, last, combine = firsts[0], lasts[0], combines[0]
            if previous not in self.sources(first):
                self.out.append(f"{self.label(first)} does not read {self.label(previous)}")
            if first is not last:
                self.split_attention(first, last, [a for a in attn if a.part == "core"])
            elif first.part == "prefill":
                self.prefill_stored(first, [a for a in attn if a.part == "store"])
            if last not in self.sources(combine):
                self.out.append(f"{self.label(combine)} does not read the residual from "
                                f"{self.label(last)}")
            if layer_spec.mlp == "dense":
                if not any(isinstance(x, Expert) and x.kind == "dense"
                           for x in self.sources(combine)):
                    self.out.append(f"{self.label(combine)} reads no dense MLP")
            else:
                self.moe_layer(layer, home, seqs, last, combine)
            previous = combine
        if previous not in self.sources(heads[0]):
            self.out.append(f"{self.label(heads[0])} does not read {self.label(previous)}")

    def split_attention(self, pre: Node, post: Node, cores: list[Node]) -> None:
        """pre -> core -> post, each part reading the one before (through transfers), and
        post the residual from pre."""
        if len(cores) != 1:
            self.out.append(f"{self.label(pre)} is cut into parts but has {len(cores)} "
                            f"attention cores")
            return
        core = cores[0]
        if pre not in self.sources(core):
            self.out.append(f"{self.label(core)} does not read {self.label(pre)}")
        if core not in self.sources(post):
            self.out.append(f"{self.label(post)} does not read {self.label(core)}")
        if pre not in self.sources(post):
            self.out.append(f"{self.label(post)} does not read the residual from "
                            f"{self.label(pre)}")

    def prefill_stored(self, prefill: Node, stores: list[Node]) -> None:
        """A prefill's keys and values reach one store, where the sequences' cache is."""
        if len(stores) != 1:
            self.out.append(f"{self.label(prefill)} keeps no cache and has {len(stores)} "
                            f"stores of its keys and values, one expected")
        elif prefill not in self.sources(stores[0]):
            self.out.append(f"{self.label(stores[0])} does not read {self.label(prefill)}")

    def moe_layer(self, layer: int, home: str, seqs: tuple[int, ...], last: Node,
                  combine: Node) -> None:
        gates = self.chain(Gate, layer, home, seqs)
        if len(gates) != 1:
            self.out.append(f"home {home} layer {layer}: expected one Gate, found {len(gates)}")
            return
        gate = gates[0]
        if last not in self.sources(gate):
            self.out.append(f"{self.label(gate)} does not read {self.label(last)}")
        experts = [ex for ex in self.routed.get(layer, []) if gate in self.sources(ex)]
        covered: dict[int, Node] = {}
        for ex in experts:
            paged = {e for src in self.reads(ex) if isinstance(src, Transfer)
                     and src.payload == "weights" for e in src.experts}
            for e in ex.experts:
                if e in covered:
                    self.out.append(f"expert {e} of layer {layer} is in both "
                                    f"{self.label(covered[e])} and {self.label(ex)}")
                covered[e] = ex
                if self.graph.placement.owner(e) != ex.device and e not in paged:
                    self.out.append(f"{self.label(ex)} computes expert {e}, owned by "
                                    f"{self.graph.placement.owner(e)}, and reads no page of it")
        missing = sorted(set(range(self.spec.moe.num_experts)) - set(covered))
        for ex in self.routed.get(layer, []):
            if ex not in experts and set(ex.experts) & set(missing):
                self.out.append(f"{self.label(ex)} does not read {self.label(gate)}'s rows "
                                f"(no dispatch from {home})")
                missing = sorted(set(missing) - set(ex.experts))
        if missing:
            self.out.append(f"layer {layer}: experts {missing[:8]} are computed by no Expert "
                            f"that reads {self.label(gate)}")
        inputs = self.sources(combine)
        if gate not in inputs:
            self.out.append(f"{self.label(combine)} does not read {self.label(gate)} (row order)")
        for ex in experts:
            if ex not in inputs:
                self.out.append(f"{self.label(combine)} does not read {self.label(ex)}'s output")
        if self.spec.moe.shared_intermediate_size and not any(
                isinstance(x, Expert) and x.kind == "shared" for x in inputs):
            self.out.append(f"{self.label(combine)} reads no shared expert")
