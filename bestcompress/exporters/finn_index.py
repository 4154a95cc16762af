"""Indexed answers to qonnx's tensor lookups while FINN's transforms run, with the same results.

qonnx answers every lookup by scanning a list: `get_by_name` (datatypes, layouts, value infos, attributes) builds
the names of the whole container, `get_initializer` and `get_tensor_shape` / `get_tensor_valueinfo` do the same,
and `find_producer` walks every node. Transforms call them per node, so a pass costs O(N²) on an N-node graph;
on the tiny spikformer_cifar graph (545 nodes) these scans were 80 % of FINN's front-end time.

`indexed_lookups()` replaces these five functions, for the duration of a `with` block, by versions that keep a
name → position map per protobuf container (upb returns the same container object for the same field while its
message lives, so the container itself is the key) and *check every answer against the container*: a cached
position is used only when the element there still carries the name asked for; otherwise the map is rebuilt from
the container (one O(N) pass, what qonnx pays on every call). Transforms may edit the graph directly (insert,
remove, rename in place): a stale position fails the check, nothing is trusted blindly.

A name that is not in a container cannot be checked that way. Absent answers are proven where ONNX's
single-assignment rule allows it (a tensor held by an initializer or a graph input has no producer node, and a
tensor a node produces, checked as above, is not an initializer), or from the map's stamp: the container's
length, its last element's name and a rename count, taken when the map was built. Containers grow by appending
(qonnx's set_tensor_datatype / set_tensor_shape / set_initializer), shrink by removal, and change names in place
only through `ModelWrapper.rename_tensor` and this package's renamers (finn_names.py, finn_ready.rename_spikes),
each of which counts a rename (`renamed()`); so an unchanged stamp means the names are the map's and the miss is
true. A changed stamp rebuilds the map, as qonnx scans. (The misses were the rest of the quadratic cost: qonnx asks
for the datatype of every un-annotated tensor, the value info of every initializer; at the default
spikformer_seq FINN-ready graph 16 of its 20 CPU seconds were those rebuilds.) graph.input and graph.output are
never answered from a stamp (FINN's insertion transforms rename their elements in place).
On graphs that break ONNX's rules (one name on two elements, a tensor both produced and initialized) qonnx raises
or returns the first match; these versions assume valid graphs there. tests/exporters/test_finn_index.py checks
that FINN's transforms give the same graph with and without them.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

_SMALL = 16  # containers shorter than this are scanned (attribute lists, graph inputs/outputs)
_KEEP = 64  # containers whose maps are kept (each map holds its container, so its model, alive)


class _Maps:
    def __init__(self) -> None:
        self.maps: OrderedDict = OrderedDict()
        self.rebuilds = 0
        self.hits = 0
        self.proven_absent = 0
        self.renames = 0  # in-place renames so far (renamed()): a stamp taken before one is void
        self.value_infos: dict = {}  # id -> graph.value_info containers seen (their misses may be stamped)

    def _stamp(self, container, field: str) -> tuple:
        return len(container), getattr(container[-1], field) if len(container) else None, self.renames

    def index(self, container, field: str, rebuild: bool = False) -> dict:
        key = (id(container), field)
        entry = self.maps.get(key)
        if entry is not None and entry[0] is container and not rebuild:
            self.maps.move_to_end(key)
            return entry[1]
        self.rebuilds += 1
        names: dict = {}
        for i, x in enumerate(container):
            n = getattr(x, field)
            names[n] = i if n not in names else -1  # -1: the name is on several elements (qonnx raises)
        self.maps[key] = (container, names, self._stamp(container, field))
        self.maps.move_to_end(key)
        while len(self.maps) > _KEEP:
            self.maps.popitem(last=False)
        return names

    def _extended(self, container, field: str) -> bool:
        """True when the map of `container` holds all its names by its stamp: unchanged, or only appended to
        (the old last element still last of the old length, no rename since), in which case the appended
        names are added and the stamp renewed; False when it needs a rebuild."""
        key = (id(container), field)
        _, names, (length, last, renames) = self.maps[key]
        now = self._stamp(container, field)
        if now == (length, last, renames):
            return True
        if renames != self.renames or now[0] < length or (length and getattr(container[length - 1], field) != last):
            return False
        for i in range(length, now[0]):  # appended: valid graphs hold each name once, so the prefix is intact
            n = getattr(container[i], field)
            names[n] = i if n not in names else -1
        self.maps[key] = (container, names, now)
        return True

    def find(self, container, name: str, field: str = "name", rebuild: bool = True, stamped: bool = True):
        """(found, item): the element of `container` whose `field` is `name`, checked against the container;
        a miss is trusted when the map's stamp still holds (unless not `stamped`); without `rebuild`, (False,
        None) may also mean that the map was stale."""
        names = self.index(container, field)
        i = names.get(name)
        if i is not None and 0 <= i < len(container):
            item = container[i]
            if getattr(item, field) == name:
                self.hits += 1
                return True, item
        if not rebuild:
            return False, None
        if i is None and stamped and self._extended(container, field):
            i = names.get(name)
            if i is None:
                self.proven_absent += 1
                return False, None
            if i >= 0:
                self.hits += 1
                return True, container[i]
        names = self.index(container, field, rebuild=True)
        i = names.get(name)
        if i is None:
            return False, None
        if i < 0:
            raise Exception("Found multiple get_by_name matches, undefined behavior")
        return True, container[i]

    def producer(self, nodes, name: str):
        """The node of `nodes` with output `name` (None when none), checked against the node list."""
        key = (id(nodes), "#producers")
        entry = self.maps.get(key)
        if entry is not None and entry[0] is nodes:
            i = entry[1].get(name)
            if i is not None and i < len(nodes) and name in nodes[i].output:
                self.hits += 1
                return nodes[i]
        self.rebuilds += 1
        out: dict = {}
        for i, node in enumerate(nodes):
            for o in node.output:
                out.setdefault(o, i)
        self.maps[key] = (nodes, out)
        self.maps.move_to_end(key)
        i = out.get(name)
        return None if i is None else nodes[i]


MAPS = _Maps()


_STAMPED_ELEMENTS = ("TensorProto", "TensorAnnotation")  # initializers, quantization annotations


def _get_by_name(container, name, name_field="name"):
    if not _ACTIVE or len(container) < _SMALL:  # a module that imported it inside the block keeps it
        return _ORIGINAL["get_by_name"](container, name, name_field)
    # stamped misses only for initializers, annotations and a graph's value_info (not nodes: node names change
    # in place; not graph inputs/outputs)
    stamped = (container[0].DESCRIPTOR.name in _STAMPED_ELEMENTS
               or MAPS.value_infos.get(id(container)) is container)
    return MAPS.find(container, name, name_field, stamped=stamped)[1]


def _scan(container, name):
    for x in container:
        if x.name == name:
            return x
    return None


def renamed() -> None:
    """Say that an element of a container was renamed in place (stamped misses taken before are void)."""
    MAPS.renames += 1


def _valueinfo(graph, name):
    """The ValueInfoProto of `name` among the graph inputs, outputs and value_info, in qonnx's order."""
    for c in (graph.input, graph.output):
        vi = _scan(c, name) if len(c) < _SMALL else MAPS.find(c, name, stamped=False)[1]
        if vi is not None:
            return vi
    MAPS.value_infos[id(graph.value_info)] = graph.value_info
    while len(MAPS.value_infos) > _KEEP:  # each holds its model alive
        del MAPS.value_infos[next(iter(MAPS.value_infos))]
    return MAPS.find(graph.value_info, name)[1]


def rename_tensor(self, old_name, new_name):
    _ORIGINAL["rename_tensor"](self, old_name, new_name)
    renamed()


def get_tensor_valueinfo(self, tensor_name):
    return _valueinfo(self._model_proto.graph, tensor_name)


def get_tensor_shape(self, tensor_name, fix_missing_init_shape=False):
    vi = _valueinfo(self._model_proto.graph, tensor_name)
    if vi is not None:
        return [x.dim_value for x in vi.type.tensor_type.shape.dim]
    init, dtype = self.get_initializer(tensor_name, return_dtype=True)
    if init is None:
        return None
    if fix_missing_init_shape:
        self.set_tensor_shape(tensor_name, init.shape, dtype=dtype)
    return list(init.shape)


def get_initializer(self, tensor_name, return_dtype=False):
    from onnx import numpy_helper
    graph = self._model_proto.graph
    found, item = MAPS.find(graph.initializer, tensor_name, rebuild=False)
    if not found and _produced(graph, tensor_name) is None and _scan(graph.input, tensor_name) is None:
        item = MAPS.find(graph.initializer, tensor_name)[1]  # else: produced or an input, so no initializer
    if item is None:
        return (None, None) if return_dtype else None
    value = numpy_helper.to_array(item)
    return (value, item.data_type) if return_dtype else value


def _produced(graph, name):
    """The producer of `name` if the producer map (built when there is none), checked, knows one; None says
    nothing."""
    nodes = graph.node
    entry = MAPS.maps.get((id(nodes), "#producers"))
    if entry is None or entry[0] is not nodes:
        return MAPS.producer(nodes, name)
    i = entry[1].get(name)
    if i is not None and i < len(nodes) and name in nodes[i].output:
        MAPS.hits += 1
        return nodes[i]
    return None


def find_producer(self, tensor_name):
    graph = self._model_proto.graph
    node = _produced(graph, tensor_name)
    if node is not None:
        return node
    if _scan(graph.input, tensor_name) is not None or MAPS.find(graph.initializer, tensor_name, rebuild=False)[0]:
        return None  # initializers and graph inputs have no producer (single assignment)
    return MAPS.producer(graph.node, tensor_name)


_ORIGINAL: dict = {}  # the originals, captured on first use and kept (modules may have bound the stand-ins)
_ACTIVE = False


def active() -> bool:
    return _ACTIVE


@contextlib.contextmanager
def indexed_lookups():
    """Within the block, qonnx's get_by_name, get_initializer, get_tensor_shape, get_tensor_valueinfo and
    find_producer answer from checked maps (see the module docstring), and SortGraph, GiveReadableTensorNames and
    GiveUniqueTensorNames are finn_names.py's. Outside it (a module that imported one of them inside the block
    keeps it) they behave as qonnx's own. Not thread-safe; nested use is a no-op."""
    global _ACTIVE
    import qonnx.core.modelwrapper as mw
    import qonnx.transformation.general as general
    import qonnx.util.basic as util
    from qonnx.core.modelwrapper import ModelWrapper

    from .finn_names import Renamer, readable_tensor_names_class, sort_graph_class, unique_tensor_names_class

    if _ACTIVE:
        yield MAPS
        return
    patched = {"get_tensor_valueinfo": get_tensor_valueinfo, "get_tensor_shape": get_tensor_shape,
               "get_initializer": get_initializer, "find_producer": find_producer, "rename_tensor": rename_tensor}
    if not _ORIGINAL:
        _ORIGINAL["get_by_name"] = util.get_by_name
        _ORIGINAL.update({name: getattr(ModelWrapper, name) for name in patched})
        for module, name in ((mw, "SortGraph"), (general, "SortGraph"), (general, "GiveReadableTensorNames"),
                             (general, "GiveUniqueTensorNames")):
            _ORIGINAL[(module.__name__, name)] = getattr(module, name)
    sort = sort_graph_class(_ORIGINAL[(general.__name__, "SortGraph")], active)
    classes = [(mw, "SortGraph", sort), (general, "SortGraph", sort),
               (general, "GiveReadableTensorNames",
                readable_tensor_names_class(_ORIGINAL[(general.__name__, "GiveReadableTensorNames")], active)),
               (general, "GiveUniqueTensorNames",
                unique_tensor_names_class(_ORIGINAL[(general.__name__, "GiveUniqueTensorNames")], active))]
    for name, fn in patched.items():
        setattr(ModelWrapper, name, fn)
    util.get_by_name = _get_by_name
    for module, name, cls in classes:
        setattr(module, name, cls)
    Renamer.on_rename = staticmethod(renamed)
    _ACTIVE = True
    try:
        yield MAPS
    finally:
        _ACTIVE = False
        util.get_by_name = _ORIGINAL["get_by_name"]
        for name in patched:
            setattr(ModelWrapper, name, _ORIGINAL[name])
        for module, name, _ in classes:
            setattr(module, name, _ORIGINAL[(module.__name__, name)])
        Renamer.on_rename = staticmethod(lambda: None)
        MAPS.maps.clear()
        MAPS.value_infos.clear()
