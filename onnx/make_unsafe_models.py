#!/usr/bin/env python3
"""Writes tests/data/unsafe/*.onnx: tiny ONNX files whose external-data references break
one model-safety rule each (src/model/safety.rs), in every place a tensor can sit.

The files are committed, so CI needs no Python; rerun this after changing the cases:

    /work/venv/ref/bin/python onnx/make_unsafe_models.py

Each file is a one-node Identity graph plus the offending tensor. `weights.bin` (4 bytes)
is the one safe location; tests/model_safety.rs creates it, and the symlinks `link.bin`
and `linkdir/`, next to the copied files.
"""

from pathlib import Path

import onnx
from onnx import TensorProto, helper

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "unsafe"


def external(name, *locations):
    """A float[1] tensor whose data is external, with these `location` entries."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[1])
    t.data_location = TensorProto.EXTERNAL
    for loc in locations:
        e = t.external_data.add()
        e.key = "location"
        e.value = loc
    for key, value in (("offset", "0"), ("length", "4")):
        e = t.external_data.add()
        e.key = key
        e.value = value
    return t


def graph(name="g", nodes=(), initializers=(), sparse=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="id")] + list(nodes)
    return helper.make_graph(
        nodes, name, [x], [y], initializer=list(initializers), sparse_initializer=list(sparse)
    )


def model(g, functions=()):
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    )
    m.functions.extend(functions)
    return m


def constant(name, tensor):
    return helper.make_node("Constant", [], [name], name=f"{name}_node", value=tensor)


def subgraph_node(inner):
    """An If node whose then/else branches are `inner` (a GraphProto)."""
    cond = helper.make_node("Constant", [], ["cond"], name="cond_node", value_int=1)
    return [
        cond,
        helper.make_node(
            "If", ["cond"], ["z"], name="if_node", then_branch=inner, else_branch=inner
        ),
    ]


def sparse(values):
    indices = helper.make_tensor("idx", TensorProto.INT64, [1], [0])
    return helper.make_sparse_tensor(values, indices, [4])


def cases():
    yield "safe", model(graph(initializers=[external("w_ok", "weights.bin")]))
    yield "absolute", model(graph(initializers=[external("w_abs", "/etc/passwd")]))
    yield "parent_dir", model(graph(initializers=[external("w_up", "../outside.bin")]))
    yield "memory_address", model(
        graph(initializers=[external("w_mem", "*/_ORT_MEM_ADDR_/*")])
    )
    yield "duplicate_location", model(
        graph(initializers=[external("w_dup", "weights.bin", "/etc/passwd")])
    )
    yield "symlink_file", model(graph(initializers=[external("w_link", "link.bin")]))
    yield "symlink_dir", model(
        graph(initializers=[external("w_linkdir", "linkdir/weights.bin")])
    )
    yield "constant_attribute", model(
        graph(nodes=[constant("c", external("c_value", "/etc/passwd"))])
    )
    inner = graph("then", initializers=[external("w_sub", "../x.bin")])
    yield "subgraph_initializer", model(graph(nodes=subgraph_node(inner)))
    deepest = graph("deep", nodes=[constant("d", external("d_value", "*/_ORT_MEM_ADDR_/*"))])
    yield "nested_subgraph_constant", model(
        graph(nodes=subgraph_node(graph("mid", nodes=subgraph_node(deepest))))
    )
    yield "sparse_initializer", model(
        graph(sparse=[sparse(external("s_values", "/etc/shadow"))])
    )
    yield "sparse_attribute", model(
        graph(
            nodes=[
                helper.make_node(
                    "Constant",
                    [],
                    ["sp"],
                    name="sp_node",
                    sparse_value=sparse(external("sp_values", "../sp.bin")),
                )
            ]
        )
    )
    fn = helper.make_function(
        "local",
        "Unsafe",
        ["a"],
        ["b"],
        [constant("f", external("f_value", "../../f.bin"))],
        [helper.make_opsetid("", 17)],
    )
    yield "function_constant", model(graph(), functions=[fn])


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, m in cases():
        # No checker: some of these are meant to be refused before ONNX Runtime sees them.
        (OUT / f"{name}.onnx").write_bytes(m.SerializeToString())
        print(f"{name}.onnx")


if __name__ == "__main__":
    main()
