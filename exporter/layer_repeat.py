"""Capture two decoder layers, write N: the streaming export's graph without tracing every layer.

The dynamo capture costs about 0.4 s per decoder layer on top of a fixed ~5 s (torch.export, the
ONNX exporter's decompositions and its optimizer all walk every layer), for a graph whose layers are
the same nodes over different weights. So the streaming export captures a model of two layers, takes
the second one as the template (the first may own values the optimizer shared between layers, like
the reshape targets of the attention), and clones it for layers 2..N-1:

- a value made inside the template gets a per-layer name; the template's input (the hidden state
  from the layer before) becomes the previous clone's output, and the nodes after the layers read the
  last clone's output;
- ``past_key_values.1.*`` inputs and ``present.1.*`` outputs become layer k's, in the graph's IO
  order; every other input (the mask, positions, rotary tables, shared constants) stays shared;
- the template's weights are checkpoint placeholders (``streaming.MARK`` + source) or small loaded
  norm weights; a clone's weights name layer k's checkpoint tensors instead;
- node scopes (``pkg.torch.onnx.name_scopes``) say ``model.layers.k``, so nodes and weights are named
  after their modules as in a full capture.

``repeat_layers`` returns None when the template does not look like that (a layer that reads another
module's weight, more than one value leaving the layer, nodes of the layer out of order), and the
caller captures all the layers instead. tests/exporter/test_layer_repeat.py compares the result with
the full capture: the same nodes, names and weights, the same outputs.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass

import onnx

TEMPLATE = 1  # the layer that is cloned
CAPTURED_LAYERS = 2  # layers in the captured model
_SCOPES = "pkg.torch.onnx.name_scopes"
_LAYER = re.compile(r"model\.layers\.(\d+)(?=\.|'|$)")
_IO_LAYER = re.compile(r"^(past_key_values|present)\.(\d+)\.")


def _layer_of(node: onnx.NodeProto) -> int | None:
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            found = {int(m.group(1)) for s in scopes for m in [_LAYER.match(s)] if m}
            return found.pop() if len(found) == 1 else None
    return None


def _layers(nodes) -> list[int | None]:
    """Each node's decoder layer; a node without scopes (the capture drops a Split's) is its
    first input's producer's."""
    made: dict[str, int | None] = {}
    out = []
    for node in nodes:
        layer = _layer_of(node)
        if layer is None and not any(p.key == _SCOPES for p in node.metadata_props) and node.input:
            layer = made.get(node.input[0])
        made.update(dict.fromkeys(node.output, layer))
        out.append(layer)
    return out


def _rename_layer(text: str, k: int) -> str:
    return _LAYER.sub(lambda m: f"model.layers.{k}" if int(m.group(1)) == TEMPLATE else m.group(0), text)


@dataclass
class _Template:
    begin: int  # index of the template's first node
    end: int  # one past its last node
    inside: set[str]  # values its nodes make
    hidden_in: str  # the residual stream it reads from the layer before
    hidden_out: str  # the one it hands on
    own: dict[str, None]  # its weights, in the graph's order


def repeat_layers(proto: onnx.ModelProto, total: int, small_weight: Callable[[str, tuple[int, ...]], bytes],
                  mark: str) -> onnx.ModelProto | None:
    """``proto`` (a capture of CAPTURED_LAYERS layers) with layers TEMPLATE+1..total-1 added, or None when
    the template cannot be cloned. ``small_weight(name, shape)`` gives the fp32 bytes of a loaded
    (small) weight; ``mark`` prefixes a placeholder's external-data location."""
    graph = proto.graph
    nodes = list(graph.node)
    t = _find_template(graph, nodes, mark)
    if t is None:
        return None
    initializers = {w.name: w for w in graph.initializer}
    graph_inputs = {x.name for x in graph.input}
    new_nodes, new_inits, new_infos, io_in, io_out = [], [], [], [], []
    prev = t.hidden_out
    for k in range(TEMPLATE + 1, total):
        names = {v: f"{v}__layer{k}" for v in t.inside}
        names[t.hidden_in] = prev
        for name in t.own:
            names[name] = _clone_weight(initializers[name], k, small_weight, mark, new_inits)
        for value in [*graph.input, *graph.output]:
            m = _IO_LAYER.match(value.name)
            if m and int(m.group(2)) == TEMPLATE:
                names[value.name] = _IO_LAYER.sub(lambda m, k=k: f"{m.group(1)}.{k}.", value.name, count=1)
                (io_in if value.name in graph_inputs else io_out).append(_clone_info(value, names, k))
        for node in nodes[t.begin:t.end]:
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            clone.name = _rename_layer(node.name, k) + f"__layer{k}" if node.name else ""
            clone.input[:] = [names.get(i, i) for i in node.input]
            clone.output[:] = [names.get(o, o) for o in node.output]
            for prop in clone.metadata_props:
                prop.value = _rename_layer(prop.value, k)
            new_nodes.append(clone)
        new_infos += [_clone_info(info, names, k) for info in graph.value_info
                      if info.name in names and info.name != t.hidden_in and not _IO_LAYER.match(info.name)]
        prev = names[t.hidden_out]
    for node in nodes[t.end:]:
        node.input[:] = [prev if i == t.hidden_out else i for i in node.input]
    del graph.node[:]
    graph.node.extend([*nodes[:t.end], *new_nodes, *nodes[t.end:]])
    _insert_weights(graph.initializer, t.own, new_inits, mark)
    graph.value_info.extend(new_infos)
    _insert_io(graph.input, io_in)
    _insert_io(graph.output, io_out)
    return proto


def _find_template(graph: onnx.GraphProto, nodes: list, mark: str) -> _Template | None:
    """Layer TEMPLATE's nodes (contiguous), the one value it reads from layer 0's residual stream, the one
    value it hands to the nodes after it, and its weights; None when any of these is not so."""
    layers = _layers(nodes)
    at = [i for i, layer in enumerate(layers) if layer == TEMPLATE]
    if not at or at != list(range(at[0], at[-1] + 1)) or any(layer not in (None, 0, TEMPLATE) for layer in layers):
        return None
    begin, end = at[0], at[-1] + 1
    inside = {o for n in nodes[begin:end] for o in n.output}
    initializers = {t.name: t for t in graph.initializer}
    graph_io = {x.name for x in [*graph.input, *graph.output]}
    made_by_add = {o for n in nodes[:begin] if n.op_type == "Add" for o in n.output}
    hidden_in = {i for n in nodes[begin:end] for i in n.input if i in made_by_add}
    leaving = {i for n in nodes[end:] for i in n.input if i in inside} | (inside & graph_io)
    hidden_out = {v for v in leaving if not _IO_LAYER.match(v)}
    if len(hidden_in) != 1 or len(hidden_out) != 1 or hidden_out & graph_io:
        return None
    own = _template_weights(nodes[begin:end], initializers, mark)
    if own is None:
        return None
    return _Template(begin, end, inside, hidden_in.pop(), hidden_out.pop(), own)


def _clone_info(info: onnx.ValueInfoProto, names: dict[str, str], k: int) -> onnx.ValueInfoProto:
    clone = onnx.ValueInfoProto()
    clone.CopyFrom(info)
    clone.name = names[info.name]
    for prop in clone.metadata_props:
        prop.value = _rename_layer(prop.value, k)
    return clone


def _template_weights(template, initializers, mark: str) -> dict[str, None] | None:
    """The template's own weights: initializers it reads that name layer TEMPLATE (as a placeholder's
    source or by name). None when it reads another module's weight (the optimizer merges equal small
    weights, say layer 0's and layer 1's norms: the clones would have to guess); constants it reads
    (shapes, rotary tables) are shared."""
    own = {}
    read = {i for n in template for i in n.input if i in initializers}
    for name in [name for name in initializers if name in read]:
        location = _placeholder_source(initializers[name], mark)
        source = location[len(mark):] if location is not None else name
        found = {int(m.group(1)) for m in _LAYER.finditer(source)}
        if found - {TEMPLATE}:
            return None
        if found:
            own[name] = None
        elif source.startswith(("model.", "lm_head.")):
            return None  # another module's weight (e.g. model.norm's, equal to this layer's and merged)
    return own


def _placeholder_source(t: onnx.TensorProto, mark: str) -> str | None:
    for entry in t.external_data:
        if entry.key == "location" and entry.value.startswith(mark):
            return entry.value
    return None


def _clone_weight(t: onnx.TensorProto, k: int, small_weight, mark: str, out: list) -> str:
    clone = onnx.TensorProto()
    clone.CopyFrom(t)
    location = _placeholder_source(t, mark)
    if location is not None:
        clone.name = f"{t.name}__layer{k}"
        for entry in clone.external_data:
            if entry.key == "location":
                entry.value = _rename_layer(location, k)
    else:
        clone.name = _rename_layer(t.name, k)
        if clone.name == t.name:
            raise AssertionError(f"layer repeat: weight {t.name!r} does not name its layer")
        clone.raw_data = small_weight(clone.name, tuple(t.dims))
    out.append(clone)
    return clone.name


def _insert_weights(initializers, own, clones: list, mark: str) -> None:
    """Insert the cloned weights as a full capture orders them: loaded (small) weights after the
    template's last loaded one, placeholders after its last placeholder, layer by layer."""
    items = list(initializers)
    for placeholders in (False, True):
        group = [c for c in clones if (_placeholder_source(c, mark) is not None) == placeholders]
        last = [i for i, t in enumerate(items) if t.name in own and (_placeholder_source(t, mark) is not None) == placeholders]
        if group:
            items[last[-1] + 1:last[-1] + 1] = group
    del initializers[:]
    initializers.extend(items)


def _insert_io(values, clones: list) -> None:
    """Insert the clones after the template layer's last graph input/output, keeping layer order."""
    if not clones:
        return
    items = list(values)
    last = max(i for i, v in enumerate(items) if (m := _IO_LAYER.match(v.name)) and int(m.group(2)) == TEMPLATE)
    del values[:]
    values.extend([*items[:last + 1], *clones, *items[last + 1:]])
