"""Dynamic int8 quantization of a large ONNX model part by part, so that only one part's weights are in memory.

onnxruntime's `quantize_dynamic` loads every weight of the model it is given: on SDXL's UNet (10.3 GB of fp32
weights) it passed 24 GB of memory and was killed. Dynamic quantization is decided node by node (each MatMul, Gemm
or Gather with a constant weight gets an int8 weight and a run-time quantization of its activation input), so the
model can be quantized in pieces and joined again:

1. the fp32 graph (read without its weights) is cut into consecutive parts by weight, as the streaming parts are
   (`streaming._assign`), but without the fused-attention rewrite, so the joined result is the graph the
   whole-file quantizer would give. Each part is a standalone graph file written next to the model, whose
   initializers point into the model's own external data file (nothing is copied);
2. each part is quantized on its own with the same settings, into a scratch folder next to the output;
3. the quantized parts are joined (nodes in order, every initializer once, the whole model's inputs and outputs,
   the union of the opset imports) and the weights gathered into one external data file (`onnx._relocate`).

An activation read by quantized nodes in two parts is quantized by both parts' quantizer (the same
DynamicQuantizeLinear node, with the same output names); the join keeps the first and drops the identical
copy, so the joined graph computes exactly what the whole-file quantization computes.

The static recipe (`quantize_static.static_int8`, calibrated QDQ) works on the whole file: it is offered only for
UNets under 1 B parameters, whose weights fit in memory, and calibrating is per tensor across the graph.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

from leansd.export import streaming
from leansd.export.errors import ExportError
from leansd.runtime.manifest import parts_index_path, read_parts_index

# Models whose external weights pass this go part-wise: the size over which the exporter keeps weights outside the
# model file and cuts the UNet into streaming parts; below it the whole-file quantizer fits in memory.
PARTWISE_BYTES = 2**31 - 2**26


def dynamic_int8(src: Path, dst: Path) -> None:
    """`quantize.onnx_dynamic_int8`: the whole file in one quantizer call, or part by part when `partwise(src)`."""
    from leansd.export.onnx import EXTERNAL_DATA_THRESHOLD, _relocate

    scratch = dst.parent / f".{dst.stem}-quantize"
    if partwise(src):
        quantize_by_parts(src, dst, lambda part, out: quantize_file(part, out, scratch), scratch)
        return
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        quantize_file(src, scratch / "model.onnx", scratch)
        _relocate(scratch / "model.onnx", dst, EXTERNAL_DATA_THRESHOLD)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def quantizer_environment(scratch: Path) -> Iterator[None]:
    """Quiet onnxruntime's quantizer and keep its temporary files in `scratch` (next to the output, not the system
    temp folder, which may be small)."""
    import logging
    import tempfile

    root_logger = logging.getLogger()
    level, temp = root_logger.level, tempfile.tempdir
    # The quantizer logs a pre-processing hint on the root logger; that step (symbolic shape inference and graph
    # optimisation) measured the same with or without here.
    root_logger.setLevel(logging.ERROR)
    tempfile.tempdir = str(scratch)
    try:
        yield
    finally:
        root_logger.setLevel(level)
        tempfile.tempdir = temp


def quantize_file(src: Path, out: Path, scratch: Path) -> None:
    """One `quantize_dynamic` call with the int8 settings, writing `out` with external data; its temporary files go
    to `scratch`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quantizer_environment(scratch):
        quantize_dynamic(
            str(src), str(out), op_types_to_quantize=["MatMul", "Gemm", "Gather"], per_channel=True, reduce_range=True,
            weight_type=QuantType.QInt8, use_external_data_format=True, extra_options={"MatMulConstBOnly": True},
        )


def partwise(src: Path, threshold: int | None = None) -> bool:
    """Whether `src` is quantized part by part: its weights in external data files pass `threshold` bytes
    (default `PARTWISE_BYTES`)."""
    return streaming.external_bytes(src) > (PARTWISE_BYTES if threshold is None else threshold)


def part_count(src: Path) -> int:
    """As many parts as the model's streaming parts index lists, else the exporter's default count for its size."""
    index = parts_index_path(src)
    if index.is_file():
        return max(2, len(read_parts_index(index)["parts"]))
    return max(2, streaming.default_parts(src))


def quantize_by_parts(src: Path, dst: Path, quantize_file: Callable[[Path, Path], None], scratch: Path,
                      count: int | None = None) -> None:
    """Quantize `src` into `dst` part by part with `quantize_file(part, out)` (one call per part, writing `out` with
    external data), using `scratch` (created, then removed) for the quantized parts."""
    from leansd.export.onnx import EXTERNAL_DATA_THRESHOLD, _relocate

    scratch.mkdir(parents=True, exist_ok=True)
    try:
        pieces, inputs, outputs = cut(src, count or part_count(src))
        quantized = []
        for i, piece in enumerate(pieces):
            out = scratch / f"part{i}" / "model.onnx"
            out.parent.mkdir()
            quantize_file(piece, out)
            piece.unlink()  # the graph file only; its weights are the model's own data file
            quantized.append(out)
        joined = scratch / "model.onnx"
        join(quantized, joined, inputs, outputs)
        _relocate(joined, dst, EXTERNAL_DATA_THRESHOLD)
    finally:
        for leftover in src.parent.glob(f".{src.stem}.int8-part*"):  # also the quantizer's own copies, on a failure
            leftover.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)


def cut(src: Path, count: int) -> tuple[list[Path], list, list]:
    """Write `src` as `count` consecutive standalone graphs next to it (hidden files sharing its weights file);
    return their paths and the whole model's inputs and outputs (ValueInfoProtos)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ExportError(f"{src} has control-flow subgraphs, which cannot be quantized part by part; export it in fp32 only")
    inferred = onnx.shape_inference.infer_shapes(model).graph
    known = {v.name: v for v in (*inferred.value_info, *inferred.output, *graph.input)}
    initializers = {t.name: t for t in graph.initializer}
    constants = {out: node for node in graph.node if node.op_type == "Constant" for out in node.output}
    nodes = [node for node in graph.node if node.op_type != "Constant"]
    assignment = streaming._assign(nodes, initializers, count)
    made_by = {out: part for node, part in zip(nodes, assignment) for out in node.output}
    last_reader: dict[str, int] = {}
    for node, part in zip(nodes, assignment):
        for name in node.input:
            last_reader[name] = max(last_reader.get(name, -1), part)
    graph_outputs = {o.name for o in graph.output}
    files = []
    for part in range(max(assignment) + 1):
        members = [node for node, p in zip(nodes, assignment) if p == part]
        reads = list(dict.fromkeys(name for node in members for name in node.input if name))
        inputs = [n for n in reads if n not in initializers and n not in constants and made_by.get(n) != part]
        outputs = [o for node in members for o in node.output if o and (o in graph_outputs or last_reader.get(o, -1) > part)]
        unknown = [n for n in inputs + outputs if n not in known]
        if unknown:
            raise ExportError(f"{src}: the type of {unknown[:3]} is unknown, so it cannot be quantized part by part; "
                              "export it in fp32 only")
        piece = onnx.helper.make_graph(
            [constants[n] for n in reads if n in constants] + members, f"{graph.name or 'model'}_part{part}",
            [known[n] for n in inputs], [known[n] for n in outputs], [initializers[n] for n in reads if n in initializers])
        piece_model = onnx.helper.make_model(piece, opset_imports=model.opset_import, ir_version=model.ir_version)
        piece_model.functions.extend(model.functions)
        file = src.with_name(f".{src.stem}.int8-part{part}.onnx")
        files.append(file)  # listed before writing, so a failed write is still cleaned up
        onnx.save(piece_model, str(file))
    return files, [v for v in graph.input if v.name not in initializers], list(graph.output)


def join(parts: list[Path], dst: Path, inputs: list, outputs: list) -> None:
    """Join quantized consecutive parts (each with its own external data file, in a folder under `dst`'s) into one
    graph file at `dst` with the whole model's `inputs` and `outputs` (ValueInfoProtos), whose initializers point
    into the parts' data files."""
    import onnx

    models = [onnx.load(str(p), load_external_data=False) for p in parts]
    produced: dict[str, Any] = {}
    nodes, initializers, value_info = [], {}, {}
    for path, model in zip(parts, models):
        folder = path.parent.relative_to(dst.parent).as_posix()
        for tensor in model.graph.initializer:
            if tensor.name not in initializers:
                _rebase(tensor, folder)
                initializers[tensor.name] = tensor
        for info in (*model.graph.value_info, *model.graph.input, *model.graph.output):
            value_info.setdefault(info.name, _unnamed_dims(info))
        for node in model.graph.node:
            if _repeated(node, produced):
                continue
            _inline_attributes(node, path.parent)
            nodes.append(node)
            produced.update({out: node for out in node.output if out})
    ends = {v.name for v in (*inputs, *outputs)}
    first = models[0]
    graph = onnx.helper.make_graph(nodes, first.graph.name.rsplit("_part", 1)[0], inputs, outputs, list(initializers.values()),
                                   value_info=[v for n, v in value_info.items() if n not in ends and n not in initializers])
    joined = onnx.helper.make_model(graph, opset_imports=_opsets(models), ir_version=max(m.ir_version for m in models))
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(joined, attr, getattr(first, attr))
    joined.metadata_props.extend(first.metadata_props)
    joined.functions.extend({(f.domain, f.name): f for m in models for f in m.functions}.values())
    onnx.save(joined, str(dst))


def _unnamed_dims(info: Any) -> Any:
    """`info` with its symbolic dimension names dropped. Each part's shape inference names unknown dimensions on its own
    ("unk__12" in one part is not "unk__12" in the next), and ONNX Runtime plans buffers by those names: kept, the
    joined SDXL UNet failed with "Shape mismatch attempting to re-use buffer"."""
    import onnx

    copy = onnx.ValueInfoProto()
    copy.CopyFrom(info)
    if copy.type.HasField("tensor_type") and copy.type.tensor_type.HasField("shape"):
        for dim in copy.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.ClearField("dim_param")
    return copy


def _repeated(node: Any, produced: dict[str, Any]) -> bool:
    """Whether `node` repeats one an earlier part already has (a shared constant, an activation quantized by two
    parts); raises when it makes a tensor an earlier part made in another way."""
    made = [out for out in node.output if out in produced]
    if not made:
        return False
    if len(made) == len(node.output) and _signature(produced[made[0]]) == _signature(node):
        return True
    raise ExportError(f"quantizing part by part made {made[0]!r} twice in different ways; quantize this model whole "
                      "on a machine with more memory and report this")


def _signature(node: Any) -> bytes:
    """The node without its name: what it computes and from what."""
    copy = type(node)()
    copy.CopyFrom(node)
    copy.name = ""
    return copy.SerializeToString(deterministic=True)


def _rebase(tensor: Any, folder: str) -> None:
    """Point an external initializer of a part at its data file as seen from the joined model's folder."""
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = f"{folder}/{entry.value}"


def _inline_attributes(node: Any, folder: Path) -> None:
    """Load tensors that the quantizer stored outside a node's attributes (large Constants) back into the node:
    the joined file is gathered by initializer and would lose them."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for attribute in node.attribute:
        for tensor in (attribute.t, *attribute.tensors) if attribute.HasField("t") else attribute.tensors:
            if uses_external_data(tensor):
                load_external_data_for_tensor(tensor, str(folder))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]


def _opsets(models: list) -> list:
    """Every domain the parts import, at the highest version any of them asks for."""
    import onnx

    versions: dict[str, int] = {}
    for model in models:
        for opset in model.opset_import:
            versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    return [onnx.helper.make_opsetid(domain, version) for domain, version in versions.items()]
