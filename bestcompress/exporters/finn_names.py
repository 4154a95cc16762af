"""qonnx's renaming and sorting bookkeeping with indices instead of scans, giving the same graph.

`GiveReadableTensorNames` (which Streamline runs after every step) renames every tensor twice with
`ModelWrapper.rename_tensor`, which sweeps every node: O(N²) per call. `ReadableTensorNames` makes the same
renames in the same order, including the cleanup qonnx runs between its two phases, through `Renamer`, which
keeps for every tensor name the nodes and container elements carrying it. The index is exact by construction:
inside these transforms every change to the graph is a rename made through it.

`rename_tensor` semantics kept: in graph inputs, outputs, value_info, initializers and quantization annotations
the one element with the old name is renamed (several raise, as qonnx's `get_by_name` does); in each node the
first occurrence among its inputs and the first among its outputs.

`SortGraphFast` is qonnx's `SortGraph` (the cleanup after every transform runs it): the same dependency sets and
the same order as `toposort_flatten` (level by level, each level sorted), computed with Kahn's algorithm in
O(N + E) instead of one scan of all remaining nodes per level, and nodes put back in one pass instead of one
equality search per removed node. Nodes without predecessors and without initializer or graph-input inputs are
dropped, as SortGraph drops them.
"""
from __future__ import annotations

from collections import defaultdict

_FIELDS = (("input", "name"), ("output", "name"), ("value_info", "name"), ("initializer", "name"),
           ("quantization_annotation", "tensor_name"))


class Renamer:
    """Renames tensors of one graph like `ModelWrapper.rename_tensor`, from an index built once."""

    on_rename = staticmethod(lambda: None)  # finn_index.indexed_lookups sets its renamed() (stamped misses)

    def __init__(self, graph) -> None:
        self.graph = graph
        self.nodes = list(graph.node)
        self.uses: dict[str, set[int]] = defaultdict(set)  # tensor name -> indices of nodes naming it
        for i, n in enumerate(self.nodes):
            for t in n.input:
                self.uses[t].add(i)
            for t in n.output:
                self.uses[t].add(i)
        self.where: dict[tuple[str, str], list] = {}  # (container, name) -> its elements with that name
        for field, key in _FIELDS:
            for x in getattr(graph, field):
                self.where.setdefault((field, getattr(x, key)), []).append(x)

    def is_initializer(self, name: str) -> bool:
        return bool(self.where.get(("initializer", name)))

    def rename(self, old: str, new: str) -> None:
        if old == new:
            return
        Renamer.on_rename()
        for field, key in _FIELDS:
            found = self.where.get((field, old))
            if not found:
                continue
            if len(found) > 1:
                raise Exception("Found multiple get_by_name matches, undefined behavior")
            x = found.pop()
            setattr(x, key, new)
            self.where.setdefault((field, new), []).append(x)
        users = self.uses.pop(old, set())
        for i in users:
            n = self.nodes[i]
            for seq in (n.input, n.output):
                for j, t in enumerate(seq):
                    if t == old:
                        seq[j] = new
                        break
            if old in n.input or old in n.output:
                self.uses[old].add(i)
            self.uses[new].add(i)


def _transformation(original, active):
    """A Transformation base whose apply is `original`'s while `active()` is false (outside indexed_lookups(): a
    module that imported the stand-in while it was active keeps it)."""
    from qonnx.transformation.base import Transformation

    class Base(Transformation):
        def apply(self, model):
            if not active():
                return original().apply(model)
            return self.fast(model)
    return Base


def unique_tensor_names_class(original, active):
    class UniqueTensorNamesFast(_transformation(original, active)):
        """qonnx's GiveUniqueTensorNames: value_info, input and output tensors renamed tensor_0, tensor_1, ..."""

        def fast(self, model):
            names = model.get_all_tensor_names()
            r = Renamer(model.graph)
            for i, name in enumerate(names):
                r.rename(name, f"tensor_{i}")
            return model, False
    return UniqueTensorNamesFast


def readable_tensor_names_class(original, active):
    class ReadableTensorNames(_transformation(original, active)):
        """qonnx's GiveReadableTensorNames: <node>_out<k>, <node>_param<k> (initializer inputs), global_in/out."""

        def fast(self, model):
            import qonnx.transformation.general as general
            unique = general.GiveUniqueTensorNames  # the stand-in while indexed_lookups() is active
            model = model.transform(unique())
            graph = model.graph
            r = Renamer(graph)
            for n in graph.node:
                assert n.name != "", "Found empty node name"
                for k, o in enumerate(n.output):  # live, as qonnx iterates
                    r.rename(o, "%s_out%d" % (n.name, k))
                k = 0
                for i in n.input:
                    if r.is_initializer(i):
                        r.rename(i, "%s_param%d" % (n.name, k))
                        k += 1
            for k, inp in enumerate(graph.input):
                r.rename(inp.name, "global_in" if k == 0 else "global_in_%d" % k)
            for k, out in enumerate(graph.output):
                r.rename(out.name, "global_out" if k == 0 else "global_out_%d" % k)
            return model, False
    return ReadableTensorNames


def _levels(deps: dict[int, set[int]]) -> list[int]:
    """toposort_flatten(deps): items level by level (no remaining dependency), each level sorted."""
    from toposort import CircularDependencyError

    deps = {k: {d for d in v if d != k} for k, v in deps.items()}
    for extra in {d for v in deps.values() for d in v} - deps.keys():
        deps[extra] = set()
    waiting = {k: len(v) for k, v in deps.items()}
    dependents: dict[int, list[int]] = defaultdict(list)
    for k, v in deps.items():
        for d in v:
            dependents[d].append(k)
    level = [k for k, c in waiting.items() if c == 0]
    out: list[int] = []
    while level:
        level.sort()
        out.extend(level)
        nxt = []
        for k in level:
            for u in dependents[k]:
                waiting[u] -= 1
                if waiting[u] == 0:
                    nxt.append(u)
        level = nxt
    if len(out) != len(deps):
        done = set(out)
        raise CircularDependencyError({k: v - done for k, v in deps.items() if k not in done})
    return out


def sort_graph_class(original, active):
    class SortGraphFast(_transformation(original, active)):
        """qonnx's SortGraph, in O(N + E) (see the module docstring)."""

        def fast(self, model):
            graph = model.graph
            if len(graph.node) == 1:
                return model, False
            nodes = list(graph.node)
            position = {id(n): i for i, n in enumerate(nodes)}
            inits = {x.name for x in graph.initializer}
            inputs = {x.name for x in graph.input}
            deps: dict[int, set[int]] = {}
            for i, n in enumerate(nodes):
                pred = model.find_direct_predecessors(n)
                if pred is None:
                    if any(t in inits or t in inputs for t in n.input):
                        deps[i] = set()
                    continue
                deps[i] = {position[id(p)] if id(p) in position else nodes.index(p) for p in pred}
            order = _levels(deps)
            kept = [type(nodes[0])() for _ in order]
            for new, i in zip(kept, order):
                new.CopyFrom(nodes[i])
            del graph.node[:]
            graph.node.extend(kept)
            return model, False
    return SortGraphFast
