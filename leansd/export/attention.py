"""Rewrite the exported attention subgraphs: into ONNX Runtime's fused `com.microsoft.MultiHeadAttention`
(`fuse_attention`), and with its scale on the scores for OpenVINO's conversion (`scale_scores_once`).

PyTorch exports `scaled_dot_product_attention` as plain ops: Q, K and V are split into heads (Reshape +
Transpose), Q and K are each scaled by sqrt(scale), then MatMul -> Softmax -> MatMul and the heads are merged
again. ONNX Runtime runs that literally and materialises the full score matrix: at SD 1.5's top resolution
(4096 tokens, 8 heads) two 512 MiB tensors per image. Its fused operator computes the same attention blockwise
on CPU (flash attention), which on an SD 1.5 UNet call measured 1 GB lower peak memory and 1.4x less time
(perf/README.md). The scale is the operator's default, 1/sqrt(head size), which is the one diffusers uses.

Only the exact exported pattern is rewritten; anything else is left as it is. The result runs on ONNX Runtime
only (OpenVINO does not read `com.microsoft` operators), so the exporter applies it to files only ONNX Runtime
reads (the weight-streaming parts, the deep-cache parts after their OpenVINO conversion), never to the UNet's
`model.onnx`, which OpenVINO and Optimum read.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MS_DOMAIN = "com.microsoft"
_SPLIT_HEADS = [0, 2, 1, 3]  # (batch, tokens, heads, dim) -> (batch, heads, tokens, dim); also the inverse
_SPLIT_HEADS_KT = [0, 2, 3, 1]  # K, transposed for Q @ K^T


class _Graph:
    def __init__(self, graph: Any) -> None:
        self.producer = {out: node for node in graph.node for out in node.output}
        self.readers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)

    def made_by(self, name: str, op: str) -> Any:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def only_reader(self, name: str, op: str) -> Any:
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 and readers[0].op_type == op else None

    def constant_int(self, name: str) -> int | None:
        from onnx import numpy_helper

        node = self.made_by(name, "Constant")
        if node is None or not node.attribute or not node.attribute[0].HasField("t"):
            return None
        value = numpy_helper.to_array(node.attribute[0].t).reshape(-1)
        return int(value[0]) if value.size == 1 else None


def _perm(node: Any) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _heads_source(g: _Graph, name: str, perm: list[int], scaled: bool) -> tuple[str, int] | None:
    """(the 3-D tensor before the head split, number of heads) for `name`, or None if the pattern differs."""
    if scaled:
        mul = g.made_by(name, "Mul")
        if mul is None:
            return None
        name = mul.input[0]
    transpose = g.made_by(name, "Transpose")
    if transpose is None or _perm(transpose) != perm:
        return None
    reshape = g.made_by(transpose.input[0], "Reshape")
    shape = reshape and g.made_by(reshape.input[1], "Concat")
    if shape is None or len(shape.input) != 4 or g.constant_int(shape.input[1]) != -1:
        return None
    heads = g.constant_int(shape.input[2])
    return (reshape.input[0], heads) if heads and heads > 0 else None


def fuse_attention(graph: Any) -> int:
    """Rewrite every exported scaled-dot-product attention in `graph` (in place); return how many."""
    from onnx import helper

    g = _Graph(graph)
    replacement: dict[int, Any] = {}
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        scores = g.made_by(softmax.input[0], "MatMul")
        weighted = g.only_reader(softmax.output[0], "MatMul")
        if scores is None or weighted is None or weighted.input[0] != softmax.output[0]:
            continue
        q = _heads_source(g, scores.input[0], _SPLIT_HEADS, scaled=True)
        k = _heads_source(g, scores.input[1], _SPLIT_HEADS_KT, scaled=True)
        v = _heads_source(g, weighted.input[1], _SPLIT_HEADS, scaled=False)
        merge = g.only_reader(weighted.output[0], "Transpose")
        merged = merge is not None and _perm(merge) == _SPLIT_HEADS and g.only_reader(merge.output[0], "Reshape")
        if not (q and k and v and merged) or not q[1] == k[1] == v[1]:
            continue
        replacement[id(merged)] = helper.make_node(
            "MultiHeadAttention", [q[0], k[0], v[0]], [merged.output[0]], domain=MS_DOMAIN, num_heads=q[1],
            name=(softmax.name or "attention").replace("Softmax", "MultiHeadAttention"),
        )
    if not replacement:
        return 0
    # The head splits, scalings, score products and merges now feed nothing: drop them.
    _drop_unread(graph, [replacement.get(id(n), n) for n in graph.node])
    return len(replacement)


def scale_scores_once(graph: Any) -> int:
    """Move the exported attention's scale from Q and K to the scores (in place); return how many were moved.

    PyTorch's export multiplies Q and K each by sqrt(scale), computed from the head size at run time. OpenVINO
    folds those two products into the Q and K projections as post-operations once shapes are static, and a
    projection with a post-operation leaves MLAS for a oneDNN kernel, which on AVX2 is the slower of the two.
    One product of the scores by `scale` (the value both square roots were taken of) is the same attention up
    to rounding, and OpenVINO's fused attention absorbs it."""
    from onnx import helper

    g = _Graph(graph)
    moved: dict[int, list] = {}
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        scores = g.made_by(softmax.input[0], "MatMul")
        if scores is None or len(g.readers.get(scores.output[0], [])) != 1:
            continue
        q, k = (g.made_by(name, "Mul") for name in scores.input)
        roots = [g.made_by(mul.input[1], "Sqrt") if mul is not None else None for mul in (q, k)]
        if None in roots or roots[0].input[0] != roots[1].input[0]:
            continue
        raw = helper.make_node("MatMul", [q.input[0], k.input[0]], [scores.output[0] + "_unscaled"], name=scores.name + "_unscaled")
        scaled = helper.make_node("Mul", [raw.output[0], roots[0].input[0]], [scores.output[0]], name=scores.name + "_scaled")
        moved[id(scores)] = [raw, scaled]
    if not moved:
        return 0
    nodes = [new for n in graph.node for new in moved.get(id(n), [n])]
    _drop_unread(graph, nodes)
    return len(moved)


def _drop_unread(graph: Any, nodes: list) -> None:
    """Replace `graph`'s nodes by `nodes`, without those whose outputs nothing reads any more."""
    kept_outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in nodes for name in node.input} | kept_outputs
        alive = [node for node in nodes if any(out in read for out in node.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    del graph.node[:]
    graph.node.extend(nodes)


def add_domain(model: Any) -> None:
    """Declare the `com.microsoft` operator set that the fused nodes use."""
    from onnx import helper

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def fuse_file(path: Path) -> int:
    """Rewrite the attention of the ONNX file at `path` in place (weights in an external data file stay where they
    are); return how many attention blocks were fused."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    fused = fuse_attention(model.graph)
    if fused:
        add_domain(model)
        onnx.save(model, str(path))
    return fused


@contextmanager
def rewritten_copy(path: Path, rewrite: Callable[[Any], int], suffix: str) -> Iterator[Path]:
    """`path`, or while in the context a copy of its model with `rewrite` applied to the graph (it returns how many
    places it changed; none: `path` itself), saved beside it as `.STEM.SUFFIX.onnx` so that its external weights
    resolve, and removed afterwards."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if not rewrite(model.graph):
        yield path
        return
    if any(n.domain == MS_DOMAIN for n in model.graph.node):
        add_domain(model)
    copy = path.with_name(f".{path.stem}.{suffix}.onnx")
    try:
        onnx.save(model, str(copy))
        del model
        yield copy
    finally:
        copy.unlink(missing_ok=True)
