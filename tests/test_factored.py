"""The factored (per-layer Kronecker) projection: a normalised JL map equal to P_out ⊗ P_in on
materialised per-example gradients, computed without them, with the variance derived in factored.py."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import source_proj as sp
from source_proj import ClassificationTask, TaskError
from source_proj.projection.base import rademacher_signs
from source_proj.projection.factored import FactoredProjector, factor_split
from source_proj.projection.factory import make_projector
from source_proj.projection.layers import FactoredLayer, factorable_layers
from source_proj.projection.transform import GradientTransform
from source_proj.tasks.gradients import PerExampleGradients


def _projector(
    model: nn.Module, dim: int, seed: int = 0, names: list[str] | None = None, **kwargs: Any
) -> FactoredProjector:
    params = dict(model.named_parameters())
    names = names or list(params)
    shapes = [(n, tuple(params[n].shape)) for n in names]
    projector = make_projector("factored", shapes, dim, seed, model=model, **kwargs)
    assert isinstance(projector, FactoredProjector) and [n for n, _ in projector.shapes] == names
    return projector


def _flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1)


def _kron_oracle(projector: FactoredProjector, names: list[str], shapes: dict[str, tuple[int, ...]]) -> torch.Tensor:
    """The k × p matrix built column by column from torch.kron of each layer's factors, placed in its block."""
    columns = {}
    for index, layer in enumerate(projector.layers):
        p_out, p_in = projector.factors(index)
        block = projector.blocks[index]
        full = torch.zeros(projector.dim, layer.out_features * layer.in_rows)
        full[block.offset : block.offset + block.k_out * block.k_in] = torch.kron(p_out, p_in)  # columns (o, i)
        if layer.kind == "hf_conv1d":  # GPT-2's Conv1D stores the weight as [in, out]
            cols = [o * layer.in_rows + i for i in range(layer.in_features) for o in range(layer.out_features)]
        else:
            cols = [o * layer.in_rows + i for o in range(layer.out_features) for i in range(layer.in_features)]
        columns[layer.weight] = full[:, cols]
        if layer.bias:
            columns[layer.bias] = full[:, [o * layer.in_rows + layer.in_features for o in range(layer.out_features)]]
    if projector.rest is not None:
        rest = projector.rest.dense()
        for name, offset, size in projector.rest.spans:
            columns[name] = torch.zeros(projector.dim, size)
            columns[name][: projector.shared_dim] = rest[:, offset : offset + size]
    for name in names:
        assert columns[name].shape[1] == math.prod(shapes[name])
    return torch.cat([columns[n] for n in names], dim=1)


class _Mixed(nn.Module):
    """Linear with and without bias, in-place ReLU, a LayerNorm (dense part) and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 9)
        self.norm = nn.LayerNorm(9)
        self.fc2 = nn.Linear(9, 7, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(7, 3)
        self.tied = nn.Linear(7, 3)
        self.tied.weight = self.head.weight  # held by two modules: projected densely

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc2(self.norm(self.fc1(x))))
        return self.head(h) + 0.5 * self.tied(h)


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
        self.c2 = nn.Conv2d(5, 4, 3, padding="same", padding_mode="reflect", bias=False)
        self.c3 = nn.Conv2d(4, 4, 2, dilation=2)
        self.grouped = nn.Conv2d(4, 4, 1, groups=2)  # not factorable: dense part
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))
        h = F.relu(self.c2(h))
        h = self.grouped(F.relu(self.c3(h)))
        return self.fc(h.mean(dim=(2, 3)))


class _Sequence(nn.Module):
    """Token inputs [B, T, d] through Linear layers (a position-wise MLP) and a Conv1d over time."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))  # [B, T, 8]
        h = torch.tanh(self.conv(h.transpose(1, 2))).transpose(1, 2)  # [B, T, 6]
        return self.out(h).sum(dim=1)


class _Tokens(nn.Module):
    """An embedding with a padding row, a position table shared by the batch, and a linear head (also used
    by test_gradients.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6, padding_idx=0)
        self.positions = nn.Embedding(7, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        where = torch.arange(x.shape[1]).unsqueeze(0)  # [1, T]: broadcast over the batch
        return self.head(torch.tanh(self.embed(x) + self.positions(where))).mean(dim=1)


def _causal_lm(name: str) -> Callable[[], nn.Module]:
    """A tiny causal LM of another family: Qwen2 (attention biases, tied head), GPT-NeoX (Pythia: fused qkv),
    Gemma (embedding scaled by √d in its own forward, tied head), Phi (partial rotary), OPT (MLP on [B·T, d])."""
    common = dict(vocab_size=23, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=8, attn_implementation="eager", pad_token_id=0)  # fmt: skip
    configs = {
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            **common, intermediate_size=32, num_key_value_heads=1, tie_word_embeddings=True)),
        "neox": (transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig(**common, intermediate_size=32)),
        "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig(
            **common, intermediate_size=32, num_key_value_heads=1, head_dim=8)),
        "phi": (transformers.PhiForCausalLM, transformers.PhiConfig(**common, intermediate_size=32)),
        "opt": (transformers.OPTForCausalLM, transformers.OPTConfig(
            **common, ffn_dim=32, word_embed_proj_dim=16, dropout=0.0)),
    }  # fmt: skip

    def build() -> nn.Module:
        torch.manual_seed(0)
        model_class, config = configs[name]
        return model_class(config)

    return build


class _ScaledEmbedding(nn.Embedding):
    """transformers' scaled word embedding (Gemma, BART): the rows times √d, in a forward of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.embedding_dim**0.5


class _Attention(nn.Module):
    """Scaled token embeddings tied to the output head, and a TransformerEncoderLayer, whose nn.MultiheadAttention
    hands its out_proj's weight to F.multi_head_attention_forward (the Linear's own forward never runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = _ScaledEmbedding(11, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x))).mean(dim=1)[:, :3]


def _classify(inputs: Callable[[torch.Generator], torch.Tensor]) -> Callable[[torch.Generator], tuple]:
    """A batch maker for a classifier: ``generator → (batch, task)``."""
    return lambda g: ((inputs(g), torch.randint(0, 3, (5,), generator=g)), ClassificationTask())


def _text(g: torch.Generator) -> tuple[dict[str, torch.Tensor], sp.Task]:
    """Token batches for a language model, every parameter attributed."""
    ids = torch.randint(1, 23, (5, 8), generator=g)
    task = sp.LanguageModelingTask(tokens_per_sequence=7, parameters=sp.ParameterSelection())
    return {"input_ids": ids, "attention_mask": torch.ones(5, 8, dtype=torch.long)}, task


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=23, n_positions=8, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)  # wte tied to lm_head, Conv1D layers, wpe over [1, T] positions


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8, attn_implementation="eager", pad_token_id=3,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


CASES = {  # model, batch and task, module_dims
    "mixed": (_Mixed, _classify(lambda g: torch.randn(5, 6, generator=g)), None),
    "conv": (_Conv, _classify(lambda g: torch.randn(5, 3, 9, 9, generator=g)), None),
    "sequence": (_Sequence, _classify(lambda g: torch.randn(5, 7, 5, generator=g)), None),
    "tokens": (_Tokens, _classify(lambda g: torch.randint(0, 11, (5, 7), generator=g)), None),
    "tokens-per-module": (_Tokens, _classify(lambda g: torch.randint(0, 11, (5, 7), generator=g)), {"*": 16}),
    "gpt2": (_gpt2, _text, None),
    "gpt2-per-module": (_gpt2, _text, {"*.attn.*": 16, "transformer.wte": 64}),
    "llama": (_llama, _text, None),
    "attention": (_Attention, _classify(lambda g: torch.randint(0, 11, (5, 7), generator=g)), None),
    **{name: (_causal_lm(name), _text, None) for name in ("qwen2", "neox", "gemma", "phi", "opt")},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_path_equals_kronecker_matrix_on_materialised_gradients(case: str) -> None:
    build, inputs, module_dims = CASES[case]
    torch.manual_seed(0)
    model = build()
    batch, task = inputs(torch.Generator().manual_seed(1))
    names = task.select_parameters(model)
    projector = _projector(model, 64, seed=3, names=names, module_dims=module_dims)
    grads_fn = PerExampleGradients(model, task, names)
    grads = grads_fn(batch, "loss")
    oracle = _flat(grads, names) @ _kron_oracle(projector, names, dict(projector.shapes)).T
    materialised = projector.project(grads)
    no_materialising = projector.project_batch(grads_fn, batch, "loss")
    scale = oracle.norm()
    assert float((materialised - oracle).norm() / scale) < 1e-5
    assert float((no_materialising - oracle).norm() / scale) < 1e-5
    assert torch.allclose(projector.dense(), _kron_oracle(projector, names, dict(projector.shapes)))
    measured = projector.project_batch(grads_fn, batch, "measurement")
    assert torch.allclose(measured, projector.project(grads_fn(batch, "measurement")), rtol=1e-4, atol=1e-5)
    if module_dims:  # matched layers: blocks of their own, one after the other, after the shared k if used
        shared = [b for b in projector.blocks if b.offset == 0 and b.k_out * b.k_in == 64]
        own = [b for b in projector.blocks if b not in shared]
        start = 64 if shared or projector.rest is not None else 0
        sizes = [b.k_out * b.k_in for b in own]
        assert own and [b.offset for b in own] == list(itertools.accumulate([start, *sizes]))[:-1]
        assert projector.dim == start + sum(b.k_out * b.k_in for b in own)


def test_transformer_layers_are_all_factored() -> None:
    layers, rest = factorable_layers(_gpt2(), [n for n, _ in _gpt2().named_parameters()])
    kinds = {la.module: (la.kind, la.tied) for la in layers}
    assert kinds["transformer.wte"] == ("embedding", (("lm_head", "linear"),))  # tied to the LM head
    assert kinds["transformer.wpe"] == ("embedding", ())
    assert kinds["transformer.h.0.attn.c_attn"] == ("hf_conv1d", ())
    assert len(layers) == 2 + 2 * 4 and all(".ln_" in n for n in rest)  # only the layer norms are dense
    c_attn = next(la for la in layers if la.module == "transformer.h.0.attn.c_attn")
    assert (c_attn.out_features, c_attn.in_features, c_attn.bias) == (48, 16, "transformer.h.0.attn.c_attn.bias")


def test_layers_found_and_the_rest_projected_densely() -> None:
    layers, rest = factorable_layers(_Mixed(), [n for n, _ in _Mixed().named_parameters()])
    assert [(la.module, la.bias, la.tied) for la in layers] == [
        ("fc1", "fc1.bias", ()),
        ("fc2", None, ()),
        ("head", None, (("tied", "linear"),)),  # one weight used by two modules: one layer, two uses
    ]
    assert rest == ["norm.weight", "norm.bias", "head.bias", "tied.bias"]
    conv_layers, conv_rest = factorable_layers(_Conv(), [n for n, _ in _Conv().named_parameters()])
    assert [la.module for la in conv_layers] == ["c1", "c2", "c3", "fc"]
    assert conv_layers[0].in_features == 3 * 3 * 3 and conv_rest == ["grouped.weight", "grouped.bias"]


def test_layers_whose_own_forward_hooks_cannot_see_are_projected_densely() -> None:
    """A subclass overriding forward (a scaled embedding of its own, BART's learned positions) and an
    nn.MultiheadAttention's out_proj are not factored layers: the hooks would see the wrong input or output (a BART
    of every parameter failed with a reshape error, any nn.MultiheadAttention refused the factored projection). The
    weight tied to such an embedding goes dense with it; the other layers still factor, transformers' scaled word
    embedding among them (BART's shared one with its four uses; Gemma's scale is tested in the layer-path cases)."""
    model = _Attention()
    layers, rest = factorable_layers(model, [n for n, _ in model.named_parameters()])
    assert [la.module for la in layers] == ["block.linear1", "block.linear2"]
    assert {"embed.weight", "block.self_attn.out_proj.weight", "block.self_attn.out_proj.bias"} <= set(rest)
    from .test_seq2seq import _bart, _pairs

    bart = _bart()
    names = [n for n, _ in bart.named_parameters()]
    layers, rest = factorable_layers(bart, names)
    assert not any("embed_positions" in la.module for la in layers) and "model.encoder.embed_positions.weight" in rest
    shared = next(la for la in layers if la.weight == "model.shared.weight")  # transformers' scaled word embedding
    assert [use for use, _ in shared.uses] == [
        "model.shared", "model.encoder.embed_tokens", "model.decoder.embed_tokens", "lm_head"]  # fmt: skip
    task = sp.Seq2SeqTask(tokens_per_sequence="own", parameters=sp.ParameterSelection())
    batch = _pairs([[5, 9, 2, 17], [4, 12, 6]], [[8, 11, 3], [21, 6]])
    projector = _projector(bart, 64, names=names)
    grads_fn = PerExampleGradients(bart, task, names)
    expected = projector.project(grads_fn(batch))
    assert float((projector.project_batch(grads_fn, batch) - expected).norm() / expected.norm()) < 1e-5


def test_factors_are_independent_rademacher_from_the_block_generator() -> None:
    layer = FactoredLayer("fc", "fc.weight", "fc.bias", 12, 20)
    projector = FactoredProjector([("fc.weight", (12, 20)), ("fc.bias", (12,))], [layer], 32, seed=5)
    assert (projector.k_out, projector.k_in) == (8, 4)
    p_out, p_in = projector.factors(0)
    assert p_out.shape == (8, 12) and p_in.shape == (4, 21)
    assert torch.equal(p_in, torch.from_numpy(rademacher_signs(5, 2**63, 21, 4)).float().T / 2)
    assert torch.equal(p_out, torch.from_numpy(rademacher_signs(5, 2**63 + 1, 12, 8)).float().T / math.sqrt(8))
    dense = projector.dense()
    assert torch.allclose(dense.abs(), torch.full_like(dense, 1 / math.sqrt(32)))
    again = FactoredProjector([("fc.weight", (12, 20)), ("fc.bias", (12,))], [layer], 32, seed=5)
    assert torch.equal(again.dense(), dense)
    other = FactoredProjector([("fc.weight", (12, 20)), ("fc.bias", (12,))], [layer], 32, seed=6)
    assert not torch.equal(other.dense(), dense)


def test_rademacher_generator_is_the_documented_philox_stream() -> None:
    # An independent reading of the spec in projection.py: little-endian bits of Philox words.
    words = np.random.Philox(key=np.array([7, 3], dtype=np.uint64)).random_raw(2)
    bits = [(int(w) >> b) & 1 for w in words for b in range(64)][: 10 * 12]
    expected = np.array([2 * b - 1 for b in bits], dtype=np.int8).reshape(10, 12)
    assert np.array_equal(rademacher_signs(7, 3, 10, 12), expected)


def test_expected_gram_is_identity_over_seeds() -> None:
    shapes = [("fc.weight", (3, 2)), ("fc.bias", (3,)), ("norm", (2,))]
    layer = FactoredLayer("fc", "fc.weight", "fc.bias", 3, 2)
    seeds = 600
    mean = sum((lambda d: d.T @ d)(FactoredProjector(shapes, [layer], 4, seed=s).dense()) for s in range(seeds)) / seeds
    # entries of PᵀP are means of k products of ±1/k: each has standard deviation 1/√(seeds·k)
    assert torch.allclose(mean, torch.eye(11), atol=5 / math.sqrt(seeds * 4))


def _factored_inner_products(u: torch.Tensor, v: torch.Tensor, dim: int, seeds: range) -> torch.Tensor:
    d_out, d_in = u.shape
    layer = FactoredLayer("fc", "fc.weight", None, d_out, d_in)
    values = []
    for s in seeds:
        projector = FactoredProjector([("fc.weight", (d_out, d_in))], [layer], dim, seed=s)
        pu, pv = projector.project({"fc.weight": torch.stack([u, v])}).double()
        values.append(float(pu @ pv))
    return torch.tensor(values, dtype=torch.float64)


def _rademacher_variance(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    return float((x.norm() ** 2 * y.norm() ** 2 + (x @ y) ** 2 - 2 * (x**2 * y**2).sum()) / k)


def test_single_position_variance_matches_the_derived_formula() -> None:
    g = torch.Generator().manual_seed(0)
    a, a2 = torch.rand(12, generator=g).double(), torch.rand(12, generator=g).double()  # post-ReLU-like
    d, d2 = torch.randn(10, generator=g).double(), torch.randn(10, generator=g).double()
    u, v = torch.outer(d, a).float(), torch.outer(d2, a2).float()
    k = 64
    k_out, k_in = factor_split(k)
    values = _factored_inner_products(u, v, k, range(1500))
    m_a, m_d = float(a @ a2), float(d @ d2)
    s_a, s_d = _rademacher_variance(a, a2, k_in), _rademacher_variance(d, d2, k_out)
    exact = (m_a**2 + s_a) * (m_d**2 + s_d) - m_a**2 * m_d**2
    truth = float((u.double() * v.double()).sum())
    sd = math.sqrt(exact / len(values))
    assert abs(float(values.mean()) - truth) < 5 * sd  # unbiased
    assert 0.8 < float(values.var()) / exact < 1.25  # the derived variance (1,500 draws: ±4% s.e.)
    dense = _rademacher_variance(u.double().flatten(), v.double().flatten(), k)
    assert exact > dense  # aligned inputs: the price of factoring, as documented


def test_sequence_variance_is_within_the_derived_bound() -> None:
    g = torch.Generator().manual_seed(2)
    u = sum(torch.outer(torch.randn(10, generator=g), torch.rand(12, generator=g)) for _ in range(6))
    v = sum(torch.outer(torch.randn(10, generator=g), torch.rand(12, generator=g)) for _ in range(6))
    k = 64
    k_out, k_in = factor_split(k)
    values = _factored_inner_products(u, v, k, range(800))
    bound = float(u.norm() ** 2 * v.norm() ** 2) * (2 / k_out + 2 / k_in + 4 / k)
    truth = float((u.double() * v.double()).sum())
    assert abs(float(values.mean()) - truth) < 5 * math.sqrt(bound / len(values))
    assert float(values.var()) < 1.2 * bound


def test_a_weight_used_outside_its_layer_is_detected() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + F.linear(x, self.fc.weight)  # the weight also used functionally

    model = Functional()
    projector = _projector(model, 4)
    grads_fn = PerExampleGradients(model, ClassificationTask(), ["fc.weight", "fc.bias"])
    batch = (torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(TaskError, match="used outside that layer's forward"):
        projector.project_batch(grads_fn, batch)


def test_a_model_held_in_bf16_passes_the_layer_check_and_a_functional_use_is_still_refused() -> None:
    """Weights stored in bf16 (an LLM loaded with torch_dtype=torch.bfloat16): the layer path and the materialised
    gradients differ by bf16's rounding alone (1–2·10⁻³, which the fp32 tolerance refused as a functional use); the
    check allows four bf16 roundings, and a weight also used outside its layer still differs by far more."""

    class Functional(nn.Module):
        def __init__(self, functional: bool) -> None:
            super().__init__()
            self.fc1, self.fc2, self.functional = nn.Linear(6, 16), nn.Linear(16, 3), functional

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc2(torch.tanh(self.fc1(x)))
            return out + F.linear(torch.tanh(self.fc1(x)), self.fc2.weight) if self.functional else out

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 6, generator=g).bfloat16(), torch.randint(0, 3, (16,), generator=g))
    torch.manual_seed(0)
    model = Functional(functional=False).bfloat16()
    names = [n for n, _ in model.named_parameters()]
    projector = _projector(model, 64)
    grads_fn = PerExampleGradients(model, ClassificationTask(), names)
    features = projector.project_batch(grads_fn, batch)
    exact = projector.project({n: g.float() for n, g in grads_fn(batch).items()})
    assert float((features - exact).norm() / exact.norm()) < 0.02
    functional = Functional(functional=True).bfloat16()
    with pytest.raises(TaskError, match="used outside that layer's forward"):
        _projector(functional, 64).project_batch(PerExampleGradients(functional, ClassificationTask(), names), batch)


def test_the_layer_check_runs_in_fp32_under_a_bf16_autocast_and_a_model_whose_forward_accelerate_wrapped() -> None:
    """Capture checks its layer path inside a training step's forward: under a mixed-precision loop's autocast, or on
    a model whose ``forward`` accelerate replaced by an autocast one (a bf16 Trainer's). In bf16 the check's two
    computations differ by about its tolerance, which refused a sound model (on an AMD CPU; 1.0e-3). The check runs
    in fp32 under an ambient autocast, and ``modes_kept`` (around capture's own passes) takes the original
    forward back for its duration."""
    from source_proj.featurize.basis import modes_kept

    model = _gpt2()
    batch, task = _text(torch.Generator().manual_seed(0))
    names = task.select_parameters(model)

    def wrapped_forward(*args: Any, **kwargs: Any) -> Any:  # what accelerate installs for a bf16 Trainer
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model._original_forward(*args, **kwargs)

    for context in ("autocast", "accelerate"):
        projector = _projector(model, 64, names=names)
        grads_fn = PerExampleGradients(model, task, names)
        if context == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                projector.check_layers(grads_fn, batch)
        else:
            model._original_forward = model.forward
            model.forward = wrapped_forward
            with modes_kept(model):
                assert model.forward == model._original_forward
                projector.check_layers(grads_fn, batch)
            assert model.forward is wrapped_forward
            with torch.no_grad():  # outside, the wrapped forward is back, and computes in bf16
                assert model(**batch).logits.dtype == torch.bfloat16
        assert projector._checked


def test_a_layer_that_mixes_examples_into_its_first_dimension_is_refused() -> None:
    """Positions flattened into a linear layer's first dimension example by example (OPT's MLP) are projected
    exactly; interleaved position by position they fail the self-check, and a first dimension that is no multiple
    of the batch is refused as it is seen."""
    from .test_gradients import _Flattening

    batch = (torch.randn(3, 2, 4), torch.tensor([0, 1, 2]))
    for interleave in (False, True):
        model = _Flattening(interleave)
        projector = _projector(model, 4)
        grads_fn = PerExampleGradients(model, ClassificationTask(), ["fc.weight", "fc.bias"])
        if interleave:
            with pytest.raises(TaskError, match="examples mixed in its input's first dimension"):
                projector.project_batch(grads_fn, batch)
        else:
            expected = projector.project(grads_fn(batch))
            assert torch.allclose(projector.project_batch(grads_fn, batch), expected, rtol=1e-5, atol=1e-6)

    class Pairs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(-1, 4)[:-1]).sum(0, keepdim=True).expand(x.shape[0], 3)

    class SequenceFirst(nn.Module):  # [T, B, 4] with T a multiple of B: not rows of positions
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.transpose(0, 1)).sum(0)

    for model, inputs in ((Pairs(), batch[0]), (SequenceFirst(), torch.randn(3, 6, 4))):
        grads_fn = PerExampleGradients(model, ClassificationTask(), ["fc.weight", "fc.bias"])
        with pytest.raises(TaskError, match="examples along the first dimension"):
            _projector(model, 4).project_batch(grads_fn, (inputs, batch[1]))


def test_elementwise_scaling_on_a_factored_layer_is_refused_and_its_rank_r_form_applied() -> None:
    torch.manual_seed(0)
    model = _Mixed()
    projector = _projector(model, 16)
    names = [n for n, _ in projector.shapes]
    grads_fn = PerExampleGradients(model, ClassificationTask(), names)
    batch = (torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
    adam = {"fc1.weight": torch.rand(9, 6) + 0.5, "norm.weight": torch.full((9,), 3.0)}
    with pytest.raises(TaskError, match="cannot apply an elementwise scaling"):
        projector.project_batch(grads_fn, batch, transform=GradientTransform(elementwise=adam))
    exact_rank = projector.scaling(adam)  # rank 1 < 6: approximated; fc1's bias column is scaled by 1
    got = projector.project_batch(grads_fn, batch, transform=exact_rank)
    assert torch.allclose(got, projector.project(exact_rank.apply(grads_fn(batch))), rtol=1e-4, atol=1e-6)
    dense = make_projector("rademacher", projector.shapes, 16, 0)
    assert torch.allclose(  # the materialising path applies the exact elementwise scaling
        dense.project_batch(grads_fn, batch, transform=dense.scaling(adam)),
        dense.project({n: g * adam[n] if n in adam else g for n, g in grads_fn(batch).items()}),
    )


def test_a_per_group_rate_ratio_is_applied_exactly_at_rank_one() -> None:
    """Groups at rates r·η scale each parameter's gradient by √r (``preconditioner.py``): one number per layer's weight
    and bias, a rank-one grid, so the factored projection's rank-one scaling is exact (a group at rate 0 included),
    where an Adam D is approximated."""
    torch.manual_seed(0)
    model = _Mixed()
    projector = _projector(model, 16)
    names = [n for n, _ in projector.shapes]
    grads_fn = PerExampleGradients(model, ClassificationTask(), names)
    batch = (torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
    ratio = {"fc1": 0.2, "norm": 0.5, "fc2": 0.0, "head": 1.0, "tied": 1.0}
    params = dict(model.named_parameters())
    scale = {n: torch.full_like(params[n], ratio[n.split(".")[0]] ** 0.5) for n in names}
    transform = projector.scaling(scale)
    assert transform.layers and all(term.rank == 1 for term in transform.layers)
    got = projector.project_batch(grads_fn, batch, transform=transform)
    expected = projector.project({n: g * scale[n] for n, g in grads_fn(batch).items()})
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_dimensions_without_a_near_square_split_are_refused() -> None:
    assert factor_split(4096) == (64, 64) and factor_split(2048) == (64, 32) and factor_split(1000) == (40, 25)
    with pytest.raises(TaskError, match="no near-square factorisation"):
        factor_split(2 * 1009)


def test_a_model_without_linear_or_conv_layers_is_refused() -> None:
    model = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(TaskError, match=r"no factorable layer"):
        _projector(model, 4)


def test_bf16_autocast_features_agree_with_fp32() -> None:
    torch.manual_seed(0)
    model = _Conv()
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(16, 3, 9, 9, generator=g), torch.randint(0, 3, (16,), generator=g))
    names = [n for n, _ in model.named_parameters()]
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    for kind in ("factored", "rademacher"):
        projector = make_projector(kind, shapes, 64, 0, model=model)
        fp32 = projector.project_batch(PerExampleGradients(model, ClassificationTask(), names), batch)
        bf16 = projector.project_batch(PerExampleGradients(model, ClassificationTask(), names, precision="bf16"), batch)
        assert bf16.dtype == torch.float32
        assert float((bf16 - fp32).norm() / fp32.norm()) < 0.05, kind
        gram32, gram16 = fp32 @ fp32.T, bf16 @ bf16.T  # inner products (what scores are made of)
        assert float((gram16 - gram32).norm() / gram32.norm()) < 0.05, kind


@pytest.mark.parametrize(("case", "fisher"), [("conv", "exact"), ("tokens", "sampled"), ("gpt2", "sampled"),
                                              ("llama", "sampled")])  # fmt: skip
def test_featurize_takes_every_quantity_from_one_forward_as_separate_passes_do(case: str, fisher: str) -> None:
    """With a factored projection featurize runs one forward per batch and a backward per quantity (training
    loss, each Fisher direction, measurement), under a transform (Adam's rank-1 scaling): the same features,
    Fisher vectors and measurement gradients as a forward per quantity."""
    from source_proj.featurize.featurize import _featurize_rows

    make, batches, _ = CASES[case]
    model = make()
    g = torch.Generator().manual_seed(0)
    made = [batches(g) for _ in range(2)]
    task = made[0][1]
    layers = factorable_layers(model, task.select_parameters(model))[0]
    names = [n for layer in layers for n in (layer.weight, layer.bias) if n]  # norms and the like left out
    projector = _projector(model, 64, names=names)
    assert projector.shares_forward()
    grads_fn = PerExampleGradients(model, task, names)
    params = dict(model.named_parameters())
    scale = {n: 0.5 + torch.rand(params[n].shape, generator=g) for n in names}
    transform = projector.scaling(scale)
    projector.check_layers(grads_fn, made[0][0])
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    options = sp.FeaturizeArguments(fisher=fisher)
    results, forwards = {}, {}
    for shared in (False, True):
        calls.clear()
        results[shared] = _featurize_rows(
            grads_fn, projector, task, [b for b, _ in made], 0, options, sp.FisherDraws.key_of([1]),
            torch.device("cpu"), where="test", transform=transform, measure=True, shared_forward=shared,
        )  # fmt: skip
        forwards[shared] = len(calls)
    for got, want in zip(results[True][:3], results[False][:3], strict=True):
        assert got.shape == want.shape and np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert forwards[True] == len(made) and forwards[False] >= 4 * len(made)
