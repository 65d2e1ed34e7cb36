"""Cut an exported ONNX model into consecutive parts that share its weights file, for weight streaming.

An SD 1.5 UNet holds 3.4 GB of fp32 weights, and ONNX Runtime keeps every one of them resident for as long
as the session lives. Low-memory mode runs the parts one after another instead, each opened for its call and
closed after it, so only one part's weights are in memory at a time (plus the activations that cross the cut).
The exporter cuts the UNet and SDXL's second text encoder this way (`leansd.export.parts`, which also cuts an
existing export in place).

The parts are small graph files next to the model: their initializers point into the model's own external
data file (same offsets), so they cost almost no disk. Weights stored inside the model file (small models)
are copied into the part that uses them. An index, `<model>.parts.json`, lists the parts in order with the
tensors each one takes and gives, and the whole model's inputs and outputs:

    {"format": "leansd-onnx-parts", "format_version": 1, "model": "model.onnx", "fused_attention": n,
     "whole": "model.fused.onnx", "inputs": [{"name", "dtype", "shape"}], "outputs": [...],
     "parts": [{"file": "model.part0.onnx", "inputs": [names], "outputs": [names], "weight_bytes": n}]}

The parts only ever run on ONNX Runtime, so their attention is rewritten into its fused operator
(`leansd.export.attention`), which never materialises the attention score matrix; the whole graph with that
rewrite is written too (`"whole"`, also sharing the weights file), for sessions that keep the model loaded.
Cuts are placed by weight: nodes are taken in the graph's (topological) order and a new part starts when the
current one would pass 1/N of the weights. Tensors that later parts still need (skip connections, the time
embedding, the text states) are outputs of the part that makes them and inputs of every part that reads them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from leansd.export import attention
from leansd.export.errors import ExportError
from leansd.runtime.manifest import PARTS_FORMAT, PARTS_FORMAT_VERSION, parts_index_path as index_path  # noqa: F401

DEFAULT_PARTS = 8
# The most weight one part should hold when the model is cut by default. Low-memory mode keeps one part mapped at
# a time beside the activations, so this bounds the UNet's share of its peak: SD 1.5 (3.4 GB) keeps 8 parts of
# 0.43 GB, SDXL's UNet (10.3 GB) gets 16 of 0.64 GB, which leaves room for 1024x1024 activations under 3 GB.
PART_BYTES = 640 * 2**20


def has_external_data(model_path: Path) -> bool:
    """Whether the model keeps its weights in an external data file (models over 2 GB do)."""
    return external_bytes(model_path) > 0


def external_bytes(model_path: Path) -> int:
    """Bytes of the model's weights kept in external data files (0: all inside the model file)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return sum(_weight_bytes(t) for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)


def default_parts(model_path: Path) -> int:
    """How many parts to cut a model into when not told: none when its weights are inside the file (under 2 GB),
    else `DEFAULT_PARTS`, or more so that no part holds much over `PART_BYTES`."""
    size = external_bytes(model_path)
    return 0 if not size else max(DEFAULT_PARTS, math.ceil(size / PART_BYTES))


def _weight_bytes(tensor: Any) -> int:
    external = {e.key: e.value for e in tensor.external_data}
    if external:
        return int(external.get("length", 0))
    return len(tensor.raw_data) or tensor.ByteSize()


def _assign(nodes: list, initializers: dict, count: int) -> list[int]:
    """Part index of each node: consecutive runs holding about 1/count of the weights each.

    Each part's budget is what is left divided by the parts left, so the shortfall of the parts before (each closes
    before the tensor that would overflow it) is spread over the rest instead of piling up in the last part.
    """
    left = sum(_weight_bytes(t) for t in initializers.values())
    budget = left / count
    assignment, part, held, seen = [], 0, 0, set()
    for node in nodes:
        new = {name for name in node.input if name in initializers and name not in seen}
        added = sum(_weight_bytes(initializers[name]) for name in new)
        if held and held + added > budget and part < count - 1:
            part, left = part + 1, left - held
            held, budget = 0, left / (count - part)
        seen |= new
        held += added
        assignment.append(part)
    return assignment


def _spec(value_info: Any) -> dict[str, Any]:
    from onnx import helper

    tensor = value_info.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim] if tensor.HasField("shape") else None
    return {"name": value_info.name, "dtype": str(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), "shape": shape}


def split(model_path: Path, count: int = DEFAULT_PARTS) -> Path:
    """Write `count` part files (and the whole graph with fused attention) and their index next to `model_path`;
    return the index's path."""
    import onnx
    from onnx import helper

    if count < 2:
        raise ExportError(f"a model is split into at least 2 parts, got {count}")
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ExportError(f"{model_path} has control-flow subgraphs, which cannot be split into parts; export without parts")
    # Types first: shape inference does not know the fused operator, whose output keeps the replaced tensor's name.
    inferred = onnx.shape_inference.infer_shapes(model).graph
    elem_type = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input, *inferred.output)}
    fused = attention.fuse_attention(graph)
    if fused:
        attention.add_domain(model)
    initializers = {t.name: t for t in graph.initializer}
    constants = {out: node for node in graph.node if node.op_type == "Constant" for out in node.output}
    nodes = [node for node in graph.node if node.op_type != "Constant"]
    assignment = _assign(nodes, initializers, count)
    made_by = {out: part for node, part in zip(nodes, assignment) for out in node.output}
    last_reader: dict[str, int] = {}
    for node, part in zip(nodes, assignment):
        for name in node.input:
            last_reader[name] = max(last_reader.get(name, -1), part)
    graph_outputs = [o.name for o in graph.output]

    entries = []
    for part in range(max(assignment) + 1):
        members = [node for node, p in zip(nodes, assignment) if p == part]
        inputs: list[str] = []
        weights: list[str] = []
        consts: list[str] = []
        for node in members:
            for name in node.input:
                if not name:
                    continue  # an omitted optional input
                if name in initializers:
                    bucket = weights
                elif name in constants:
                    bucket = consts
                elif made_by.get(name) != part:
                    bucket = inputs
                else:
                    continue
                if name not in bucket:
                    bucket.append(name)
        outputs = [o for node in members for o in node.output if o in graph_outputs or last_reader.get(o, -1) > part]
        unknown = [n for n in inputs + outputs if not elem_type.get(n)]
        if unknown:
            raise ExportError(f"{model_path}: the type of {unknown[:3]} is unknown, so the model cannot be split; export without parts")
        file = f"{model_path.stem}.part{part}.onnx"
        piece = helper.make_graph(
            [constants[c] for c in consts] + members,
            f"{graph.name or 'model'}_part{part}",
            [helper.make_tensor_value_info(n, elem_type[n], None) for n in inputs],
            [helper.make_tensor_value_info(n, elem_type[n], None) for n in outputs],
            [initializers[w] for w in weights],  # external ones keep pointing into the model's data file
        )
        piece_model = helper.make_model(piece, opset_imports=model.opset_import, ir_version=model.ir_version)
        piece_model.functions.extend(model.functions)
        onnx.save(piece_model, str(model_path.with_name(file)))
        entries.append({"file": file, "inputs": inputs, "outputs": outputs,
                        "weight_bytes": sum(_weight_bytes(initializers[w]) for w in weights)})

    whole = None
    if fused:
        # The whole graph with fused attention, for ONNX Runtime sessions that keep the model loaded.
        whole = f"{model_path.stem}.fused.onnx"
        onnx.save(model, str(model_path.with_name(whole)))
    index = index_path(model_path)
    index.write_text(json.dumps({
        "format": PARTS_FORMAT, "format_version": PARTS_FORMAT_VERSION, "model": model_path.name, "fused_attention": fused, "whole": whole,
        "inputs": [_spec(v) for v in graph.input if v.name not in initializers],
        "outputs": [_spec(v) for v in graph.output],
        "parts": entries,
    }, indent=1) + "\n", encoding="utf-8")
    return index

