"""Int8 linear layers (`embed.dtype: int8`): the quantisation rules and their invariances."""

from __future__ import annotations

import pytest
import torch

from negprep.models.quantize import QMAX, Int8Linear, quantize_linears, quantize_rows


def test_rows_quantize_to_their_own_scale_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows six decades apart
    x[5] = 0.0
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (64, 1)
    assert q.abs().max().item() == QMAX  # each row's largest value maps to +-127, never to -128
    assert torch.equal(q[5], torch.zeros(96, dtype=torch.int8))  # zeros stay zeros, no NaN
    err = (q.float() * scale - x).abs()
    assert (err <= scale / 2 * (1 + 1e-6)).all()  # rounding to nearest, with the row's own step
    # a row's values depend on that row alone: the tiny rows are not crushed by the big ones
    q_alone, _ = quantize_rows(x[:1])
    assert torch.equal(q_alone, q[:1]) and (q[0] != 0).sum() > 80


def test_int8_linear_is_close_to_the_float_layer_and_exact_per_row():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(96, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=g) * torch.linspace(0.01, 2, 40)[:, None])
    q = Int8Linear(lin)
    x = torch.randn(3, 7, 96, generator=g)
    with torch.inference_mode():
        want, got = lin(x), q(x)
        assert got.shape == (3, 7, 40) and got.dtype == torch.float32
        rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
        assert rel.max() < 0.02, rel.max()
        # integer accumulation is exact: a token's output is the same bits alone or in any batch
        assert torch.equal(q(x[1:2, 3:4]), got[1:2, 3:4])
        assert torch.equal(q(x.flip(0)), got.flip(0))
    no_bias = Int8Linear(torch.nn.Linear(96, 40, bias=False))
    assert no_bias.bias is None and no_bias(x).shape == (3, 7, 40)


def test_every_linear_layer_of_a_model_is_replaced():
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(),
        torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)),
        torch.nn.Embedding(10, 8),
    )
    assert quantize_linears(model) == 2
    assert isinstance(model[0], Int8Linear) and isinstance(model[2][1], Int8Linear)
    assert isinstance(model[2][0], torch.nn.LayerNorm) and isinstance(model[3], torch.nn.Embedding)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert model[0](torch.randn(2, 16)).shape == (2, 32)


@pytest.mark.parametrize("rows", [1, 17, 300])
def test_any_number_of_rows_runs(rows):
    # the integer GEMM has shape limits on some backends: negprep feeds it every batch size
    q = Int8Linear(torch.nn.Linear(384, 1536))
    assert q(torch.randn(rows, 384)).shape == (rows, 1536)


def test_onnx_rewrite_runs_the_same_rule_in_onnxruntime():
    """quantize_onnx: a MatMul by a constant becomes per-token int8 x per-channel int8, and
    onnxruntime computes exactly the integer product the rule defines."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from negprep.models.quantize import quantize_onnx

    rng = np.random.default_rng(2)
    w = (rng.standard_normal((96, 40)) * np.linspace(0.01, 2, 40)).astype(np.float32)
    w[:, 7] = 0.0  # a dead output channel keeps a usable scale
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Relu", ["mm"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "tokens", 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "tokens", 40])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert quantize_onnx(model) == 1
    assert not any(t.name == "w" for t in model.graph.initializer)  # the fp32 weight is gone
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (rng.standard_normal((3, 7, 96)) * np.logspace(-3, 3, 7)[None, :, None]).astype(np.float32)
    x[0, 2] = 0.0
    got = sess.run(None, {"x": x})[0]
    # the rule in numpy: symmetric per-token and per-channel scales, an exact integer product
    ws = np.abs(w).max(0) / QMAX
    ws[ws == 0] = 1
    wq = np.round(w / ws).astype(np.int64)
    amax = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-12)
    xq = np.floor(x * (QMAX / amax) + 0.5).astype(np.int64)
    assert np.abs(xq).max() <= QMAX
    want = np.maximum((xq @ wq) * ws * (amax / QMAX), 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert np.array_equal(got[0, 2], np.zeros(40, np.float32))  # a zero token stays zero
    exact = np.maximum(x @ w, 0)
    rel = np.linalg.norm(got - exact, axis=-1) / np.maximum(np.linalg.norm(exact, axis=-1), 1e-30)
    assert rel[np.linalg.norm(exact, axis=-1) > 0].max() < 0.03  # every token on its own scale, six decades apart
    # a token's output is the same bits alone or in any batch
    assert np.array_equal(sess.run(None, {"x": x[1:2, 3:4]})[0], got[1:2, 3:4])
    assert np.array_equal(sess.run(None, {"x": x[::-1].copy()})[0], got[::-1])
