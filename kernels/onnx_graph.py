"""ONNX graphs for EmbeddingBag, built by hand (opset 18, IR version 10).

``torch.onnx.export`` of EmbeddingBag yields a per-bag Loop that is slow and wrong for
empty bags, so the graphs are written here. Both share one tail, the padded layout that
DESIGN.md measured as deterministic and fast on CUDA:

    rows = Gather(table, ids [L, B]) -> [L, B, D]   (fp16 rows widened to float32)
    rows *= weights [L, B, 1]                        (sum mode, per-sample weights)
    out  = ReduceSum / ReduceMax over axis 0         -> [B, D]
    mean: out /= max(count, 1); max: out = 0 where count == 0

Positions past a bag's end and ``padding_idx`` occurrences point at a sentinel row
appended to the table (zeros for sum/mean, ``-inf`` for max), so no mask pass is needed.
No ScatterND: with ``reduction`` it drops duplicate updates on the multi-threaded CPU EP.

- :func:`padded_model` (CUDA) takes the flat ``indices`` (and ``weights``) once per call
  and, per run, the ``starts`` and ``lengths`` of a bucket of bags: it lays the ids out
  ``[B, L]`` on the device (sentinel past each bag's end and for ``padding_idx``),
  counts them for mean/max and transposes them for the tail, so the host copies no id.
  The table is the graph input ``table`` so it can be bound once (and live on the GPU)
  and may exceed protobuf's 2 GB. Only elementwise ops, Gather, Transpose and the
  reductions run, which all have CUDA kernels, so nothing falls back to the CPU.
- :func:`scanned_model` (CPU EP) runs the same tail inside a ``Scan`` over ``[C, L, b]``
  ids: one run pools C steps of b bags, each step small enough to stay in cache.
- :func:`flat_model` is the standalone export: inputs ``indices`` ``[N]`` and
  ``offsets`` ``[B]`` (bag starts, PyTorch's default layout), optional
  ``per_sample_weights`` ``[N]``, output ``embeddings`` ``[B, D]``; the table is an
  initializer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.storage import code_bytes

OPSET = 18
#: onnx >= 1.23 writes IR 14, which onnxruntime 1.31 rejects; opset 18 needs only IR 8+.
IR_VERSION = 10


def sentinel_value(mode: str) -> float:
    """The sentinel row's value: neutral for the reduction of ``mode``."""
    return float("-inf") if mode == "max" else 0.0


def with_sentinel(weight: npt.NDArray[Any], mode: str, dtype: npt.DTypeLike | None = None
                  ) -> npt.NDArray[Any]:
    """``weight`` with one sentinel row appended (a new ``(R + 1, D)`` array)."""
    dtype = weight.dtype if dtype is None else np.dtype(dtype)
    table = np.empty((weight.shape[0] + 1, weight.shape[1]), dtype=dtype)
    table[:-1] = weight
    table[-1] = sentinel_value(mode)
    return table


def _helpers() -> Any:
    import onnx
    from onnx import TensorProto, helper

    return onnx, TensorProto, helper


def element_types(table_dtype: Any) -> tuple[int, int]:
    """(table, compute) ONNX element types of a storage (a NumPy float dtype or a storage
    name): half and quantized tables compute in float32; int8 and int4 tables are uint8
    codes (their scales and biases are separate float32 inputs).

    Raises:
        ValueError: not a storage the graphs serve.
    """
    _, tensor_proto, _ = _helpers()
    name = table_dtype if isinstance(table_dtype, str) and table_dtype in (
        "bfloat16", "int8", "int4") else np.dtype(table_dtype).name
    types = {"float16": (tensor_proto.FLOAT16, tensor_proto.FLOAT),
             "float32": (tensor_proto.FLOAT, tensor_proto.FLOAT),
             "float64": (tensor_proto.DOUBLE, tensor_proto.DOUBLE),
             "bfloat16": (tensor_proto.BFLOAT16, tensor_proto.FLOAT),
             "int8": (tensor_proto.UINT8, tensor_proto.FLOAT),
             "int4": (tensor_proto.UINT8, tensor_proto.FLOAT)}
    if name not in types:
        raise ValueError(f"ONNX tables must be float16, bfloat16, float32, float64, int8 or "
                         f"int4; got {table_dtype}")
    return types[name]


def quantized(table_dtype: Any) -> bool:
    """Whether a storage's graph takes ``scales`` and ``biases`` inputs."""
    return isinstance(table_dtype, str) and table_dtype in ("int8", "int4")


def _decode(nodes: list[Any], initializers: list[Any], table_dtype: Any, dim: int,
            rows: str, ids: str, compute: int) -> str:
    """Nodes turning gathered stored rows ``[L, B, W]`` into values ``[L, B, D]``; returns
    the values' name. int4 codes are split with integer Div/Mul/Sub (ops every execution
    provider has) into low nibble first, then each code becomes ``code * scale + bias``
    with the row's scale and bias gathered by ``ids``."""
    _, tensor_proto, helper = _helpers()
    node = helper.make_node
    if not quantized(table_dtype):
        table_type, _ = element_types(table_dtype)
        if table_type == compute:
            return rows
        nodes.append(node("Cast", [rows], ["rows_wide"], to=compute))
        return "rows_wide"
    codes = rows
    if table_dtype == "int4":
        initializers += [helper.make_tensor("sixteen", tensor_proto.INT32, [], [16]),
                         helper.make_tensor("last_axis", tensor_proto.INT64, [1], [-1]),
                         helper.make_tensor("flat_codes", tensor_proto.INT64, [3],
                                            [0, 0, -1])]
        nodes += [node("Cast", [rows], ["packed32"], to=tensor_proto.INT32),
                  node("Div", ["packed32", "sixteen"], ["high"]),
                  node("Mul", ["high", "sixteen"], ["high16"]),
                  node("Sub", ["packed32", "high16"], ["low"]),
                  node("Unsqueeze", ["low", "last_axis"], ["low1"]),
                  node("Unsqueeze", ["high", "last_axis"], ["high1"]),
                  node("Concat", ["low1", "high1"], ["pairs"], axis=-1),
                  node("Reshape", ["pairs", "flat_codes"], ["nibbles"])]
        codes = "nibbles"
        if dim % 2:
            initializers += [helper.make_tensor("zero_col", tensor_proto.INT64, [1], [0]),
                             helper.make_tensor("dim_col", tensor_proto.INT64, [1], [dim])]
            nodes.append(node("Slice", [codes, "zero_col", "dim_col", "last_axis"],
                              ["nibbles_cut"]))
            codes = "nibbles_cut"
    initializers.append(helper.make_tensor("axis_last", tensor_proto.INT64, [1], [-1]))
    nodes += [node("Cast", [codes], ["codes_f"], to=compute),
              node("Gather", ["scales", ids], ["row_scales"], axis=0),
              node("Gather", ["biases", ids], ["row_biases"], axis=0),
              node("Unsqueeze", ["row_scales", "axis_last"], ["row_scales3"]),
              node("Unsqueeze", ["row_biases", "axis_last"], ["row_biases3"]),
              node("Mul", ["codes_f", "row_scales3"], ["scaled"]),
              node("Add", ["scaled", "row_biases3"], ["values"])]
    return "values"


def table_inputs(table_dtype: Any, dim: int, row_scaled: bool = False) -> list[Any]:
    """The graph inputs holding the table: ``table`` (``[rows, W]``), for int8 and int4
    ``scales`` and ``biases`` (``[rows]`` float32), and when ``row_scaled`` the
    ``row_factors`` every decoded row is multiplied by (``[rows]``, compute dtype)."""
    _, tensor_proto, helper = _helpers()
    table_type, compute = element_types(table_dtype)
    width = code_bytes(table_dtype, dim) if quantized(table_dtype) else dim
    inputs = [helper.make_tensor_value_info("table", table_type, ["rows", width])]
    if quantized(table_dtype):
        inputs += [helper.make_tensor_value_info(name, tensor_proto.FLOAT, ["rows"])
                   for name in ("scales", "biases")]
    if row_scaled:
        inputs.append(helper.make_tensor_value_info("row_factors", compute, ["rows"]))
    return inputs


def _tail(nodes: list[Any], initializers: list[Any], mode: str, table_dtype: Any, dim: int,
          compute: int, weighted: bool, output: str, *, ids: str = "ids",
          weights: str = "weights", counts: str = "counts", row_scaled: bool = False
          ) -> None:
    """Append Gather -> decode -> (row scale) -> (Mul) -> Reduce -> (mean/max fix-up)
    nodes over ``[L, B]`` ids (and weights, and counts for mean/max) read from the values
    named so."""
    onnx, tensor_proto, helper = _helpers()
    initializers.append(helper.make_tensor("axis0", tensor_proto.INT64, [1], [0]))
    nodes.append(helper.make_node("Gather", ["table", ids], ["gathered"], axis=0))
    rows = _decode(nodes, initializers, table_dtype, dim, "gathered", ids, compute)
    if row_scaled:
        initializers.append(helper.make_tensor("factor_axis", tensor_proto.INT64, [1], [-1]))
        nodes += [helper.make_node("Gather", ["row_factors", ids], ["factors"], axis=0),
                  helper.make_node("Unsqueeze", ["factors", "factor_axis"], ["factors3"]),
                  helper.make_node("Mul", [rows, "factors3"], ["scaled_rows"])]
        rows = "scaled_rows"
    if weighted:
        initializers.append(helper.make_tensor("axis2", tensor_proto.INT64, [1], [2]))
        nodes.append(helper.make_node("Unsqueeze", [weights, "axis2"], ["weights3"]))
        nodes.append(helper.make_node("Mul", [rows, "weights3"], ["weighted"]))
        rows = "weighted"
    reduce = "ReduceMax" if mode == "max" else "ReduceSum"
    pooled = output if mode == "sum" else "pooled"
    nodes.append(helper.make_node(reduce, [rows, "axis0"], [pooled], keepdims=0))
    if mode == "sum":
        return
    initializers.append(helper.make_tensor("axis1", tensor_proto.INT64, [1], [1]))
    nodes.append(helper.make_node("Unsqueeze", [counts, "axis1"], ["counts2"]))
    if mode == "mean":
        initializers.append(helper.make_tensor("one", compute, [], [1.0]))
        nodes.append(helper.make_node("Max", ["counts2", "one"], ["divisor"]))
        nodes.append(helper.make_node("Div", [pooled, "divisor"], [output]))
    else:
        initializers.append(helper.make_tensor("zero", compute, [], [0.0]))
        nodes.append(helper.make_node("Equal", ["counts2", "zero"], ["empty"]))
        nodes.append(helper.make_node("Where", ["empty", "zero", pooled], [output]))


def _model(nodes: list[Any], initializers: list[Any], inputs: list[Any], dim: int,
           compute: int, name: str, leading: tuple[str, ...] = ("bags",)) -> Any:
    """A checked opset-18 / IR-10 model whose output ``embeddings`` is ``[*leading, dim]``."""
    onnx, tensor_proto, helper = _helpers()
    graph = helper.make_graph(
        nodes, name, inputs,
        [helper.make_tensor_value_info("embeddings", compute, [*leading, dim])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="bagserve")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _padded_inputs(mode: str, compute: int, weighted: bool, layout: list[str],
                   prefix: str = "") -> list[Any]:
    """``ids`` (and ``weights``) shaped ``layout``, ``counts`` for mean/max without its
    length axis."""
    _, tensor_proto, helper = _helpers()
    inputs = [helper.make_tensor_value_info(f"{prefix}ids", tensor_proto.INT64, layout)]
    if weighted:
        inputs.append(helper.make_tensor_value_info(f"{prefix}weights", compute, layout))
    if mode != "sum":
        counts_layout = [axis for axis in layout if axis != "length"]
        inputs.append(helper.make_tensor_value_info(f"{prefix}counts", compute,
                                                    counts_layout))
    return inputs


def padded_model(mode: str, dim: int, table_dtype: npt.DTypeLike, *, sentinel: int,
                 padding_idx: int | None = None, weighted: bool = False,
                 row_scaled: bool = False) -> Any:
    """The CUDA kernel's graph: the ids as they arrive, laid out ``[B, L]`` on the device.

    Inputs: the table, ``indices`` ``[N]`` (and ``weights`` ``[N]``), and per run
    ``starts`` and ``lengths`` ``[B]`` of non-empty bags and ``steps`` ``[L]`` =
    ``0..L-1`` for ``L`` >= the longest of them. Positions past a bag's end and
    ``padding_idx`` read row ``sentinel``; counts for mean/max are computed here too.
    Output ``embeddings`` ``[B, D]``. Returns an ``onnx.ModelProto``.
    """
    _, tensor_proto, helper = _helpers()
    node = helper.make_node
    _, compute = element_types(table_dtype)
    inputs = [*table_inputs(table_dtype, dim, row_scaled),
              helper.make_tensor_value_info("indices", tensor_proto.INT64, ["ids"])]
    if weighted:
        inputs.append(helper.make_tensor_value_info("weights", compute, ["ids"]))
    inputs += [helper.make_tensor_value_info(name, tensor_proto.INT64, [axis])
               for name, axis in (("starts", "bags"), ("lengths", "bags"),
                                  ("steps", "length"))]
    initializers = [helper.make_tensor("axis_bags", tensor_proto.INT64, [1], [1]),
                    helper.make_tensor("first", tensor_proto.INT64, [], [0]),
                    helper.make_tensor("sentinel", tensor_proto.INT64, [], [sentinel])]
    # [B, L] positions into ``indices``; those past a bag's end read position 0 (any
    # valid one) and are masked: the host never copies or pads an id.
    nodes = [node("Unsqueeze", ["starts", "axis_bags"], ["starts2"]),
             node("Unsqueeze", ["lengths", "axis_bags"], ["lengths2"]),
             node("Add", ["starts2", "steps"], ["positions"]),
             node("Less", ["steps", "lengths2"], ["inside"]),
             node("Where", ["inside", "positions", "first"], ["safe_positions"]),
             node("Gather", ["indices", "safe_positions"], ["taken"], axis=0)]
    keep = "inside"
    if padding_idx is not None:
        initializers.append(helper.make_tensor("padding", tensor_proto.INT64, [],
                                               [padding_idx]))
        nodes += [node("Equal", ["taken", "padding"], ["is_padding"]),
                  node("Not", ["is_padding"], ["not_padding"]),
                  node("And", ["inside", "not_padding"], ["kept"])]
        keep = "kept"
    nodes += [node("Where", [keep, "taken", "sentinel"], ["ids_bl"]),
              node("Transpose", ["ids_bl"], ["ids_lb"], perm=[1, 0])]
    if weighted:
        # Masked too: a neighbour's inf weight times the sentinel's zeros would be NaN.
        initializers.append(helper.make_tensor("no_weight", compute, [], [0.0]))
        nodes += [node("Gather", ["weights", "safe_positions"], ["weights_taken"], axis=0),
                  node("Where", [keep, "weights_taken", "no_weight"], ["weights_bl"]),
                  node("Transpose", ["weights_bl"], ["weights_lb"], perm=[1, 0])]
    if mode != "sum":
        nodes += [node("Cast", [keep], ["kept_values"], to=compute),
                  node("ReduceSum", ["kept_values", "axis_bags"], ["counts"], keepdims=0)]
    _tail(nodes, initializers, mode, table_dtype, dim, compute, weighted, "embeddings",
          ids="ids_lb", weights="weights_lb", row_scaled=row_scaled)
    return _model(nodes, initializers, inputs, dim, compute, f"embedding_bag_{mode}_padded")


def scanned_model(mode: str, dim: int, table_dtype: npt.DTypeLike, *,
                  weighted: bool = False, row_scaled: bool = False) -> Any:
    """The CPU EP kernel's graph: the padded tail inside a ``Scan`` over chunks.

    Inputs ``ids`` (and ``weights``) ``[C, L, b]``, ``counts`` ``[C, b]`` for mean/max;
    output ``embeddings`` ``[C, b, D]``. Each step gathers one chunk of ``L x b`` rows, small
    enough to stay in the core's cache until it is reduced, so a whole share of the batch
    is one run: no per-chunk Python, no thread handoff per chunk (measured 1.2x faster on
    the CPU EP than one run per chunk from Python). Returns an ``onnx.ModelProto``.
    """
    _, _, helper = _helpers()
    _, compute = element_types(table_dtype)
    step_inputs = _padded_inputs(mode, compute, weighted, ["length", "bags"], prefix="step_")
    nodes: list[Any] = []
    initializers: list[Any] = []
    _tail(nodes, initializers, mode, table_dtype, dim, compute, weighted, "step_embeddings",
          ids="step_ids", weights="step_weights", counts="step_counts",
          row_scaled=row_scaled)
    body = helper.make_graph(
        nodes, "chunk", step_inputs,
        [helper.make_tensor_value_info("step_embeddings", compute, ["bags", dim])],
        initializers)
    tables = table_inputs(table_dtype, dim, row_scaled)
    inputs = [*tables, *_padded_inputs(mode, compute, weighted, ["chunks", "length", "bags"])]
    scanned = [i.name for i in inputs[len(tables):]]
    scan = helper.make_node("Scan", scanned, ["embeddings"], num_scan_inputs=len(scanned),
                            body=body)
    return _model([scan], [], inputs, dim, compute, f"embedding_bag_{mode}_scanned",
                  leading=("chunks", "bags"))


def flat_model(table: npt.NDArray[Any], mode: str, *, padding_idx: int | None = None,
               weighted: bool = False, include_last_offset: bool = False) -> Any:
    """The standalone export graph over a sentinel-extended ``(R + 1, D)`` table.

    ``offsets`` holds the ``B`` bag starts, or ``B + 1`` entries ending with ``N`` when
    ``include_last_offset``. The table (float16/32/64) becomes an initializer; save
    models over 2 GB with external data. Returns an ``onnx.ModelProto``.
    """
    onnx, tensor_proto, helper = _helpers()
    from onnx import numpy_helper

    sentinel = table.shape[0] - 1
    _, compute = element_types(table.dtype)
    inputs = [helper.make_tensor_value_info("indices", tensor_proto.INT64, ["ids"]),
              helper.make_tensor_value_info("offsets", tensor_proto.INT64, ["bags"])]
    if weighted:
        inputs.append(helper.make_tensor_value_info("per_sample_weights", compute, ["ids"]))
    init = [numpy_helper.from_array(table, "table"),
            helper.make_tensor("sentinel", tensor_proto.INT64, [1], [sentinel]),
            helper.make_tensor("zero_i", tensor_proto.INT64, [1], [0]),
            helper.make_tensor("zero_s", tensor_proto.INT64, [], [0]),
            helper.make_tensor("one_s", tensor_proto.INT64, [], [1]),
            helper.make_tensor("one_i", tensor_proto.INT64, [1], [1]),
            helper.make_tensor("big", tensor_proto.INT64, [1], [np.iinfo(np.int64).max]),
            helper.make_tensor("axis_a", tensor_proto.INT64, [1], [0]),
            helper.make_tensor("axis_b", tensor_proto.INT64, [1], [1])]
    node = helper.make_node
    nodes = [node("Shape", ["indices"], ["total"])]
    if include_last_offset:
        # starts = offsets[:-1]; ends = offsets[1:]
        init.append(helper.make_tensor("minus_one", tensor_proto.INT64, [1], [-1]))
        nodes += [node("Slice", ["offsets", "zero_i", "minus_one"], ["starts"]),
                  node("Slice", ["offsets", "one_i", "big"], ["ends"])]
    else:
        # starts = offsets; ends = offsets[1:] ++ [N]
        nodes += [node("Identity", ["offsets"], ["starts"]),
                  node("Slice", ["offsets", "one_i", "big"], ["next_starts"]),
                  node("Concat", ["next_starts", "total"], ["ends"], axis=0)]
    nodes += [
        node("Sub", ["ends", "starts"], ["lengths"]),
        # L = max(lengths ++ [0]); steps = 0..L-1
        node("Concat", ["lengths", "zero_i"], ["lengths0"], axis=0),
        node("ReduceMax", ["lengths0"], ["longest"], keepdims=0),
        node("Range", ["zero_s", "longest", "one_s"], ["steps"]),
        node("Unsqueeze", ["steps", "axis_b"], ["steps_col"]),       # [L, 1]
        node("Unsqueeze", ["starts", "axis_a"], ["starts_row"]),    # [1, B]
        node("Unsqueeze", ["lengths", "axis_a"], ["lengths_row"]),  # [1, B]
        node("Add", ["steps_col", "starts_row"], ["positions"]),    # [L, B]
        node("Less", ["steps_col", "lengths_row"], ["inside"]),     # [L, B]
        # Positions past a bag's end read a sentinel id appended to indices.
        node("Where", ["inside", "positions", "total"], ["safe_positions"]),
        node("Concat", ["indices", "sentinel"], ["indices_ext"], axis=0),
        node("Gather", ["indices_ext", "safe_positions"], ["raw_ids"], axis=0),
    ]
    ids = "raw_ids"
    if padding_idx is not None:
        init.append(helper.make_tensor("padding", tensor_proto.INT64, [], [padding_idx]))
        nodes += [node("Equal", [ids, "padding"], ["is_padding"]),
                  node("Where", ["is_padding", "sentinel", ids], ["ids"])]
    else:
        nodes.append(node("Identity", [ids], ["ids"]))
    if weighted:
        init.append(helper.make_tensor("zero_f", compute, [1], [0.0]))
        nodes += [node("Concat", ["per_sample_weights", "zero_f"], ["weights_ext"], axis=0),
                  node("Gather", ["weights_ext", "safe_positions"], ["weights"], axis=0)]
    if mode != "sum":
        nodes += [node("Equal", ["ids", "sentinel"], ["is_sentinel"]),
                  node("Not", ["is_sentinel"], ["is_real"]),
                  node("Cast", ["is_real"], ["real"], to=compute),
                  node("ReduceSum", ["real", "axis_a"], ["counts"], keepdims=0)]
    _tail(nodes, init, mode, table.dtype, table.shape[1], compute, weighted, "embeddings")
    return _model(nodes, init, inputs, table.shape[1], compute, f"embedding_bag_{mode}")
