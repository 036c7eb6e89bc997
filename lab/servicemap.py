"""The service map: who talks to whom, on which port, and what Cilium decided — from Hubble flows.

Input is what `hubble observe -o json` prints: one ``GetFlowsResponse`` per line,
``{"flow": {...}, "node_name": ..., "time": ...}`` (protojson with the proto field names, zero
values omitted, 64-bit integers as strings). It is read through hubble-relay (cluster-wide) or from
a file of recorded lines.

* **Nodes** are workloads, grouped by namespace: ``workloads[0].name`` when Hubble names the
  owner, else the pod name without its ReplicaSet/pod hash. An endpoint Cilium gives a reserved
  identity (``reserved:world``, ``host``, ``remote-node``, ``kube-apiserver``, ``ingress``…) is
  drawn as that identity. When the flows come from several clusters of a mesh, each group also
  names its cluster.
* **Edges** are (source → destination, port/protocol, verdict, drop reason), weighted by how many
  flows Hubble reported. A reply (``is_reply: true``) is the answer of a flow already drawn, so it
  adds no edge of its own; nor do TRACED and TRANSLATED events (socket-LB traces: observed before
  any verdict was reached).

Drawing: networkx orders the namespaces in layers (callers left, callees right) and matplotlib
draws them to SVG; the text is kept as text and every node and edge is an SVG group whose id names
it (``node:<key>``, ``edge:<source>-><destination>:<port>/<protocol>:<verdict>``), so the picture
can be checked and searched. The same map is written as Mermaid for a GitHub job summary.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Cilium's reserved identities (pkg/identity/numericidentity.go): label name by numeric identity.
RESERVED_IDS = {1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init", 6: "remote-node",
                7: "kube-apiserver", 8: "ingress", 9: "world", 10: "world"}
# `reserved:world-ipv4` / `-ipv6` (dual stack) are the world as well.
_RESERVED_ALIASES = {"world-ipv4": "world", "world-ipv6": "world"}
CLUSTER_LABEL = "k8s:io.cilium.k8s.policy.cluster="
# Kubernetes' random name suffixes (ReplicaSet hash, pod suffix) use this alphabet
# (k8s.io/apimachinery/pkg/util/rand: no vowels, so no words).
_SAFE = "[bcdfghjklmnpqrstvwxz2456789]"
_DEPLOYMENT_POD = re.compile(rf"^(?P<base>.+)-{_SAFE}{{1,10}}-{_SAFE}{{5}}$")
_GENERATED_POD = re.compile(rf"^(?P<base>.+)-{_SAFE}{{5}}$")  # DaemonSet, Job
_ORDINAL_POD = re.compile(r"^(?P<base>.+)-\d+$")  # StatefulSet
# GetFlowsResponse members that are not flows (relay node events, lost events): no problem.
_NOT_FLOWS = ("node_status", "lost_events", "agent_event", "debug_event")

NO_VERDICT = ("TRACED", "TRANSLATED")
COLORS = {"FORWARDED": "#2e7d32", "DROPPED": "#c62828"}
OTHER_COLOR = "#6d6d6d"


@dataclass(frozen=True, order=True)
class Node:
    key: str  # "<group>/<name>", or "reserved:<identity>", or "ip:<address>"
    name: str
    group: str  # the namespace ("<cluster>/<namespace>" in a mesh); "" for reserved identities
    reserved: bool = False


@dataclass(frozen=True, order=True)
class Edge:
    source: str
    destination: str
    port: int
    protocol: str
    verdict: str
    reason: str = ""

    @property
    def label(self) -> str:
        where = f"{self.port}/{self.protocol}" if self.port else self.protocol
        return f"{where} {self.reason}" if self.reason else where

    @property
    def gid(self) -> str:
        return (f"edge:{self.source}->{self.destination}:{self.port}/{self.protocol}:"
                f"{self.verdict}")


@dataclass
class ServiceMap:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: dict[Edge, int] = field(default_factory=dict)  # edge → number of flows
    flows: int = 0  # flows drawn (replies excluded)
    replies: int = 0
    ignored: int = 0  # TRACED / TRANSLATED events
    problems: list[str] = field(default_factory=list)  # "line N: why", each line skipped

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": [{"key": n.key, "name": n.name, "group": n.group, "reserved": n.reserved}
                      for n in sorted(self.nodes.values())],
            "edges": [{"source": e.source, "destination": e.destination, "port": e.port,
                       "protocol": e.protocol, "verdict": e.verdict, "reason": e.reason,
                       "count": c} for e, c in sorted(self.edges.items())],
            "flows": self.flows, "replies": self.replies, "ignored": self.ignored,
            "problems": list(self.problems),
        }


# -- reading ---------------------------------------------------------------------------------------

def parse_lines(lines: Iterable[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Flows from `hubble observe -o json` lines, and one problem per malformed line (skipped)."""
    flows: list[dict[str, Any]] = []
    problems: list[str] = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(doc, dict):
            problems.append(f"line {number}: not a JSON object")
            continue
        flow = doc.get("flow")
        if flow is None and "verdict" in doc:  # a bare Flow (hubble's legacy JSON output)
            flow = doc
        if flow is None:
            if not any(k in doc for k in _NOT_FLOWS):
                problems.append(f"line {number}: no `flow` in it (keys: "
                                f"{', '.join(sorted(doc)) or 'none'})")
            continue
        why = _malformed(flow)
        if why:
            problems.append(f"line {number}: {why}")
            continue
        flows.append(flow)
    return flows, problems


def _malformed(flow: Any) -> str:
    if not isinstance(flow, dict):
        return "`flow` is not an object"
    for key in ("source", "destination", "IP", "l4"):
        if key in flow and not isinstance(flow[key], dict):
            return f"`flow.{key}` is not an object"
    if not isinstance(flow.get("verdict", ""), str):
        return "`flow.verdict` is not a verdict name"
    for ep in ("source", "destination"):
        labels = (flow.get(ep) or {}).get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            return f"`flow.{ep}.labels` is not a list of strings"
    for proto, ports in (flow.get("l4") or {}).items():
        port = ports.get("destination_port", 0) if isinstance(ports, dict) else None
        if isinstance(port, bool) or not isinstance(port, int):
            return f"`flow.l4.{proto}.destination_port` is not a number"
    return ""


def read_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        return parse_lines(f)


# -- building --------------------------------------------------------------------------------------

def workload_name(endpoint: dict[str, Any]) -> str:
    """The owner's name when Hubble gives it, else the pod name without generated suffixes."""
    for w in endpoint.get("workloads") or []:
        if isinstance(w, dict) and w.get("name"):
            return str(w["name"])
    pod = str(endpoint.get("pod_name") or "")
    for pattern in (_DEPLOYMENT_POD, _GENERATED_POD, _ORDINAL_POD):
        m = pattern.match(pod)
        if m:
            return str(m.group("base"))
    if pod:
        return pod
    labels = dict(label.split("=", 1) for label in endpoint.get("labels") or []
                  if "=" in label)
    for key in ("k8s:app.kubernetes.io/name", "k8s:k8s-app", "k8s:app"):
        if labels.get(key):
            return str(labels[key])
    return "?"


def reserved_names(endpoint: dict[str, Any]) -> list[str]:
    names = {_RESERVED_ALIASES.get(label[9:], label[9:])
             for label in endpoint.get("labels") or [] if label.startswith("reserved:")}
    if not names and not endpoint.get("namespace"):
        ident = endpoint.get("identity")
        if isinstance(ident, int) and ident in RESERVED_IDS:
            names.add(RESERVED_IDS[ident])
    return sorted(names)


def _cluster(endpoint: dict[str, Any]) -> str:
    for label in endpoint.get("labels") or []:
        if label.startswith(CLUSTER_LABEL):
            return str(label)[len(CLUSTER_LABEL):]
    return ""


def endpoint_node(endpoint: dict[str, Any], ip: str, cluster_prefix: bool = False) -> Node:
    reserved = reserved_names(endpoint)
    if reserved:
        name = "+".join(reserved)
        return Node(f"reserved:{name}", name, "", reserved=True)
    namespace = str(endpoint.get("namespace") or "")
    if namespace:
        group = namespace
        if cluster_prefix and _cluster(endpoint):
            group = f"{_cluster(endpoint)}/{namespace}"
        name = workload_name(endpoint)
        return Node(f"{group}/{name}", name, group)
    return Node(f"ip:{ip or '?'}", ip or "?", "")


def _port(flow: dict[str, Any]) -> tuple[int, str]:
    for proto, info in (flow.get("l4") or {}).items():
        port = info.get("destination_port", 0) if isinstance(info, dict) else 0
        return (int(port) if proto in ("TCP", "UDP", "SCTP") else 0), str(proto)
    return 0, "IP"


def _reason(flow: dict[str, Any]) -> str:
    if flow.get("verdict") != "DROPPED":
        return ""
    desc = flow.get("drop_reason_desc")
    if desc:
        return str(desc)
    code = flow.get("drop_reason")
    return f"drop reason {code}" if code else ""


def build(flows: Iterable[dict[str, Any]], problems: Iterable[str] = ()) -> ServiceMap:
    flows = list(flows)
    clusters = {_cluster(f.get(side) or {}) for f in flows for side in ("source", "destination")}
    prefix = len(clusters - {""}) > 1
    m = ServiceMap(problems=list(problems))
    counts: dict[Edge, int] = defaultdict(int)
    for flow in flows:
        if flow.get("is_reply") is True:
            m.replies += 1
            continue
        if flow.get("verdict") in NO_VERDICT:
            m.ignored += 1
            continue
        ip = flow.get("IP") or {}
        src = endpoint_node(flow.get("source") or {}, str(ip.get("source") or ""), prefix)
        dst = endpoint_node(flow.get("destination") or {}, str(ip.get("destination") or ""),
                            prefix)
        port, proto = _port(flow)
        m.nodes[src.key], m.nodes[dst.key] = src, dst
        counts[Edge(src.key, dst.key, port, proto, str(flow.get("verdict") or "UNKNOWN"),
                    _reason(flow))] += 1
        m.flows += 1
    m.edges = dict(sorted(counts.items()))
    return m


# -- layout ----------------------------------------------------------------------------------------

NODE_W, NODE_H = 2.3, 0.42  # inches
COLUMN_GAP, ROW_GAP, GROUP_PAD, GROUP_TITLE, MARGIN = 1.6, 0.22, 0.18, 0.3, 0.45
CALLER = "@caller"  # suffix of the place of a reserved identity drawn on the callers' side


@dataclass
class Layout:
    """Where each node is drawn. A reserved identity that both calls and is called in a cycle
    (the world as the Gateway's clients and as the internet an app is kept from) gets two
    places, ``<key>@caller`` on the callers' side and ``<key>`` on the callees' side, so the
    picture reads left to right."""

    positions: dict[str, tuple[float, float]]  # place → centre (inches, y up)
    groups: dict[str, tuple[float, float, float, float]]  # group → (x, y, width, height)
    split: set[str]  # node keys drawn twice
    width: float
    height: float

    def source(self, key: str) -> str:
        return key + CALLER if key in self.split else key


def _callers_first(graph: Any) -> list[str]:
    """Eades, Lin and Smyth's greedy order for a small feedback arc set: sources first, sinks
    last, else the node that calls most more than it is called. Deterministic (ties by name)."""
    g = graph.copy()
    head: list[str] = []
    tail: list[str] = []
    while g:
        sinks = sorted(n for n in g if g.out_degree(n) == 0)
        sources = sorted(n for n in g if g.in_degree(n) == 0 and g.out_degree(n) > 0)
        if sinks:
            tail[:0] = sinks
            g.remove_nodes_from(sinks)
        elif sources:
            head += sources
            g.remove_nodes_from(sources)
        else:
            best = max(sorted(g), key=lambda n: g.out_degree(n) - g.in_degree(n))
            head.append(best)
            g.remove_node(best)
    return head + tail


def _group_graph(m: ServiceMap, split: set[str]) -> tuple[Any, dict[str, list[str]]]:
    """Groups (a namespace, or one place of a reserved identity) and who calls whom."""
    import networkx as nx

    def group(place: str) -> str:
        node = m.nodes[place.removesuffix(CALLER)]
        return node.group or place

    graph = nx.DiGraph()
    members: dict[str, list[str]] = defaultdict(list)
    for key in sorted(m.nodes):
        places = [key + CALLER, key] if key in split else [key]
        for place in places:
            members[group(place)].append(place)
            graph.add_node(group(place))
    for edge in m.edges:
        a = group(edge.source + CALLER if edge.source in split else edge.source)
        b = group(edge.destination)
        if a != b:
            graph.add_edge(a, b)
    return graph, members


def _split_reserved(m: ServiceMap) -> set[str]:
    """Reserved identities to draw twice, busiest first, until no cycle runs through one."""
    import networkx as nx

    split: set[str] = set()
    while True:
        graph, _ = _group_graph(m, split)
        cyclic = {g for c in nx.strongly_connected_components(graph) if len(c) > 1 for g in c}
        candidates = [k for k in sorted(m.nodes) if k in cyclic and m.nodes[k].reserved]
        if not candidates:
            return split
        split.add(max(candidates, key=lambda k: (graph.in_degree(k) * graph.out_degree(k),
                                                 _outside(m.nodes[k].name))))


def _outside(name: str) -> int:
    """On a tie, split what lies outside the cluster first; the Gateway's Envoy (a proxy in
    the middle of its flows) last."""
    order = ("ingress", "health", "kube-apiserver", "host", "remote-node", "world")
    return max((order.index(n) for n in name.split("+") if n in order), default=-1)


def layout(m: ServiceMap) -> Layout:
    """Groups in layers by networkx: longest path from the callers over the edges that agree
    with a callers-first order (the rest are drawn backwards), callees that call nobody in the
    last layer; in each layer ordered by where their neighbours are; nodes stacked in groups."""
    import networkx as nx

    split = _split_reserved(m)
    graph, members = _group_graph(m, split)
    rank = {g: i for i, g in enumerate(_callers_first(graph))}
    forward = nx.DiGraph()
    forward.add_nodes_from(graph)
    forward.add_edges_from((a, b) for a, b in graph.edges if rank[a] < rank[b])
    layer_of = {g: i for i, gen in enumerate(nx.topological_generations(forward)) for g in gen}
    last = max(layer_of.values(), default=0)
    for g in layer_of:
        if graph.out_degree(g) == 0 and graph.in_degree(g) > 0:
            layer_of[g] = last
    layers: dict[int, list[str]] = defaultdict(list)
    for g in sorted(layer_of):
        layers[layer_of[g]].append(g)

    def height_of(g: str) -> float:
        h = len(members[g]) * (NODE_H + ROW_GAP) - ROW_GAP
        return h + (2 * GROUP_PAD + GROUP_TITLE if _boxed(m, g) else 0)

    def stack(order: dict[int, list[str]]) -> dict[str, float]:
        """Centre y of each group, top-down, each column centred on the tallest."""
        totals = {i: sum(height_of(g) for g in gs) + 2 * ROW_GAP * (len(gs) - 1)
                  for i, gs in order.items()}
        tallest = max(totals.values(), default=0.0)
        out: dict[str, float] = {}
        for i, gs in order.items():
            y = (tallest - totals[i]) / 2
            for g in gs:
                out[g] = y + height_of(g) / 2
                y += height_of(g) + 2 * ROW_GAP
        return out

    # a few barycentre sweeps (left to right, then back) to untangle the edges
    order = {i: list(gs) for i, gs in sorted(layers.items())}
    undirected = graph.to_undirected()
    for sweep in range(4):
        ys = stack(order)
        columns = sorted(order) if sweep % 2 == 0 else sorted(order, reverse=True)
        for i in columns:
            keys = {g: _barycentre(g, [ys[n] for n in undirected.neighbors(g)
                                       if layer_of[n] != i], ys) for g in order[i]}
            order[i] = sorted(order[i], key=keys.__getitem__)
            ys = stack(order)

    centres = stack(order)
    inner_h = max((centres[gs[-1]] + height_of(gs[-1]) / 2 for gs in order.values()),
                  default=NODE_H)
    height = inner_h + 2 * MARGIN + 0.5  # room for the title
    width = len(order) * (NODE_W + 2 * GROUP_PAD) + (len(order) - 1) * COLUMN_GAP + 2 * MARGIN
    positions: dict[str, tuple[float, float]] = {}
    boxes: dict[str, tuple[float, float, float, float]] = {}
    for column, i in enumerate(sorted(order)):
        x_left = MARGIN + column * (NODE_W + 2 * GROUP_PAD + COLUMN_GAP)
        for g in order[i]:
            top = MARGIN + 0.5 + centres[g] - height_of(g) / 2
            boxed = _boxed(m, g)
            if boxed:
                boxes[g] = (x_left, height - top - height_of(g), NODE_W + 2 * GROUP_PAD,
                            height_of(g))
            for j, place in enumerate(members[g]):
                cy = top + (GROUP_TITLE + GROUP_PAD if boxed else 0) + \
                    j * (NODE_H + ROW_GAP) + NODE_H / 2
                positions[place] = (x_left + GROUP_PAD + NODE_W / 2, height - cy)
    return Layout(positions, boxes, split, width, height)


def _barycentre(group: str, neighbours: list[float], ys: dict[str, float]) -> tuple[float, str]:
    return (sum(neighbours) / len(neighbours) if neighbours else ys[group], group)


def _boxed(m: ServiceMap, group: str) -> bool:
    """A namespace gets a box; a reserved identity stands alone."""
    node = m.nodes.get(group.removesuffix(CALLER))
    return node is None or not node.reserved


# -- drawing ---------------------------------------------------------------------------------------

def _color(verdict: str) -> str:
    return COLORS.get(verdict, OTHER_COLOR)


def _width(count: int) -> float:
    return min(1.0 + 1.1 * math.log2(count), 6.0)


def _short(text: str, limit: int = 26) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def to_svg(m: ServiceMap, out: Path, title: str = "service map") -> Path:
    """Draw the map to ``out`` (SVG). Same map → byte-identical file (no date, fixed ids)."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    lay = layout(m)
    with matplotlib.rc_context({"svg.hashsalt": "lab.map", "svg.fonttype": "none",
                                "font.family": "DejaVu Sans"}):
        fig = Figure(figsize=(max(lay.width, 6.0), max(lay.height, 2.5)))
        FigureCanvasSVG(fig)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, max(lay.width, 6.0))
        ax.set_ylim(0, max(lay.height, 2.5))
        ax.set_axis_off()
        for group, (x, y, w, h) in sorted(lay.groups.items()):
            box = FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.08",
                                 facecolor="#f5f5f5", edgecolor="#9e9e9e", linestyle="--",
                                 linewidth=0.8, zorder=0)
            box.set_gid(f"group:{group}")
            ax.add_patch(box)
            ax.text(x + 0.1, y + h - 0.08, _short(group, 34), fontsize=8, color="#424242",
                    va="top", ha="left", fontweight="bold", zorder=1)
        patches: dict[str, FancyBboxPatch] = {}
        for place in sorted(lay.positions):
            key = place.removesuffix(CALLER)
            node = m.nodes[key]
            cx, cy = lay.positions[place]
            patch = FancyBboxPatch(
                (cx - NODE_W / 2, cy - NODE_H / 2), NODE_W, NODE_H,
                boxstyle="round,pad=0,rounding_size=0.2" if node.reserved
                else "round,pad=0,rounding_size=0.05",
                facecolor="#fff3e0" if node.reserved else "#e3f2fd",
                edgecolor="#ef6c00" if node.reserved else "#1565c0", linewidth=1.0, zorder=2)
            patch.set_gid(f"node:{place}")
            ax.add_patch(patch)
            patches[place] = patch
            ax.text(cx, cy, _short(node.name), fontsize=8.5, ha="center", va="center",
                    zorder=3).set_gid(f"node-label:{place}")
        siblings: dict[tuple[str, str], int] = defaultdict(int)  # parallel edges fan out
        for edge, count in m.edges.items():
            pair = (edge.source, edge.destination)
            k = siblings[pair]
            siblings[pair] += 1
            _draw_edge(ax, edge, count, k, lay, patches, FancyArrowPatch)
        ax.text(MARGIN, lay.height - 0.25 if lay.height > 2.5 else 2.25,
                f"{title}: {len(m.nodes)} workloads, {len(m.edges)} edges, {m.flows} flows",
                fontsize=10, ha="left", va="center", fontweight="bold")
        handles = [Line2D([], [], color=COLORS["FORWARDED"], lw=2, label="forwarded"),
                   Line2D([], [], color=COLORS["DROPPED"], lw=2, ls="--",
                          label="dropped (reason on the edge)"),
                   Line2D([], [], color=OTHER_COLOR, lw=2, label="other verdict")]
        ax.legend(handles=handles, loc="lower left", fontsize=7, frameon=False,
                  bbox_to_anchor=(0.0, 0.0))
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="svg", metadata={"Date": None, "Creator": "kind-cilium-lab"})
    return out


def _draw_edge(ax: Any, edge: Edge, count: int, k: int, lay: Layout,
               patches: dict[str, Any], arrow_cls: Any) -> None:
    source = lay.source(edge.source)
    (x1, y1), (x2, y2) = lay.positions[source], lay.positions[edge.destination]
    color = _color(edge.verdict)
    if source == edge.destination:  # a workload talking to itself: a loop on its right
        x1, y1 = x1 + NODE_W / 2, y1 + NODE_H / 4
        x2, y2 = x2 + NODE_W / 2, y2 - NODE_H / 4
        rad = -1.8 - 0.4 * k
        patch_a = patch_b = None
    else:
        rad = 0.08 + 0.14 * k
        patch_a, patch_b = patches[source], patches[edge.destination]
    arrow = arrow_cls((x1, y1), (x2, y2), arrowstyle="-|>", mutation_scale=10,
                      connectionstyle=f"arc3,rad={rad}", color=color, linewidth=_width(count),
                      linestyle="--" if edge.verdict == "DROPPED" else "-",
                      patchA=patch_a, patchB=patch_b, shrinkA=1, shrinkB=1, zorder=4)
    arrow.set_gid(edge.gid)
    ax.add_patch(arrow)
    # the quadratic Bézier's midpoint: a quarter of each end, half the control point
    mx = (x1 + x2) / 2 + rad * (y2 - y1) / 2
    my = (y1 + y2) / 2 - rad * (x2 - x1) / 2
    ax.text(mx, my, f"{edge.label} ×{count}", fontsize=6.5, color=color, ha="center",
            va="center", zorder=5,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                  "alpha": 0.85}).set_gid(f"edge-label:{edge.gid[5:]}")


def to_mermaid(m: ServiceMap, title: str = "service map") -> str:
    """A Mermaid flowchart (GitHub renders it in Markdown and job summaries)."""
    ids = {key: f"n{i}" for i, key in enumerate(sorted(m.nodes))}

    def text(s: str) -> str:
        return '"' + s.replace('"', "#quot;") + '"'

    lines = ["flowchart LR"]
    groups: dict[str, list[Node]] = defaultdict(list)
    for node in sorted(m.nodes.values()):
        groups[node.group].append(node)
    for i, (group, nodes) in enumerate(sorted(groups.items())):
        indent = "  "
        if group:
            lines.append(f"  subgraph g{i}[{text(group)}]")
            indent = "    "
        for node in nodes:
            shape = f"(({text(node.name)}))" if node.reserved else f"[{text(node.name)}]"
            lines.append(f"{indent}{ids[node.key]}{shape}")
        if group:
            lines.append("  end")
    styles = []
    for i, (edge, count) in enumerate(m.edges.items()):
        arrow = "-.->" if edge.verdict == "DROPPED" else "-->"
        verdict = "" if edge.verdict in ("FORWARDED", "DROPPED") else f" {edge.verdict}"
        lines.append(f"  {ids[edge.source]} {arrow}|{text(f'{edge.label}{verdict} ×{count}')}| "
                     f"{ids[edge.destination]}")
        styles.append(f"  linkStyle {i} stroke:{_color(edge.verdict)}")
    return "\n".join([f"%% {title}: {len(m.nodes)} workloads, {len(m.edges)} edges, "
                      f"{m.flows} flows", *lines, *styles]) + "\n"


def mermaid_markdown(m: ServiceMap, title: str = "service map") -> str:
    return f"### {title}\n\n```mermaid\n{to_mermaid(m, title)}```\n"


# -- reading through hubble-relay ------------------------------------------------------------------

DEFAULT_LAST = 2000


def observe_argv(relay: str, since: str | None, namespace: str | None,
                 last: int | None) -> list[str]:
    """`hubble observe` through the relay, printing what is there (no --follow)."""
    argv = ["hubble", "observe", "--server", relay, "--output", "json"]
    if since:
        argv += ["--since", since]
    if namespace:
        argv += ["--namespace", namespace]
    if last is not None or not since:
        argv += ["--last", str(last if last is not None else DEFAULT_LAST)]
    return argv


def read_relay(kube: Any, since: str | None = None, namespace: str | None = None,
               last: int | None = None) -> str:
    """Flows cluster-wide through hubble-relay, asked from a Cilium agent pod (where the hubble
    CLI lives), as `hubble observe -o json` lines."""
    from lab.errors import LabError
    from lab.hubble import ready_pod, relay_address

    if last is not None and last <= 0:
        raise LabError("--last must be a positive number of flows", "e.g. --last 500")
    agent = ready_pod(kube, "kube-system", "k8s-app=cilium", "Cilium agent")
    res = kube.exec("kube-system", agent, observe_argv(relay_address(kube), since, namespace,
                                                       last),
                    container="cilium-agent", timeout=120)
    if res.returncode != 0:
        raise LabError(f"`hubble observe` through the relay failed: "
                       f"{(res.stderr or res.stdout).strip()[:300]}",
                       "check the relay with `invoke lab.status` (the cni gate)")
    return str(res.stdout)
