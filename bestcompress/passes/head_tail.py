"""The ops between a coupled trunk's last stream and the model's output (token/time means, the head, ...): which
nodes they are, which of their modules hold state (copied for head2), and the state resets a copy must repeat.
Used by InsertReversibleCouplings (passes/reversible.py) to build head2's path.
"""
from __future__ import annotations

from torch import fx, nn

from ..trunk import GraphIndex


def tail_nodes(idx: GraphIndex, z_lasts: list[fx.Node], out: fx.Node) -> list[fx.Node]:
    """Nodes computing the output from the last stream (mean over tokens/T, head, ...), in graph order; with one
    last stream per time step, the union of the steps' tails (a step's tail leaves out other steps' nodes)."""
    nodes: set[fx.Node] = set()
    for t, z in enumerate(z_lasts):
        region = idx.region(z, out)
        if len(z_lasts) > 1:
            region = {n for n in region if n.meta.get("bc_time_step") in (None, t)}
        nodes |= region
    return sorted(nodes, key=idx.pos.__getitem__)


def is_stateful(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def copy_state_resets(graph: fx.Graph, copies: dict[str, str], tail: set[fx.Node]) -> None:
    """A state reset the forward makes on a copied module (`utils.reset(self)` on an init_hidden output neuron:
    `reset_module(get_attr)` in the graph) is made on its copy too, so head2's neuron starts each call at rest."""
    for n in list(graph.nodes):
        if n.op != "get_attr" or n.target not in copies:
            continue
        for user in [u for u in n.users if u.op == "call_function" and u not in tail]:
            with graph.inserting_after(user):
                attr = graph.get_attr(copies[n.target])
            with graph.inserting_after(attr):
                graph.node_copy(user, lambda a, n=n, attr=attr: attr if a is n else a)


def weight_layers(gm: fx.GraphModule, tail: list[fx.Node]) -> list[str]:
    """The Conv/Linear modules the tail calls, in call order, each once (the head is the last)."""
    return list(dict.fromkeys(n.target for n in tail if n.op == "call_module" and isinstance(
        gm.get_submodule(n.target), (nn.Linear, nn.modules.conv._ConvNd))))
