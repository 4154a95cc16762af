"""The Pipeline: built from the recipe as data (tracing is one of its passes), each pass from its own recipe
section; a failure of any kind names the pass and the passes before it. Plus one registry-driven test: every
registered recipe on every zoo family."""
import pytest
import torch
from torch import fx, nn

from bestcompress.convert import binarize
from bestcompress.errors import DataError, ModelError
from bestcompress.model_facts import example_input_for
from bestcompress.nn.binary import is_binary_layer
from bestcompress.passes import (DEFAULT_PIPELINE, BinarizeAttention, BinarizeWeights, Pass, PassContext, PassError,
                                 Pipeline, TraceModel, get_pass, list_passes)
from bestcompress.recipe import list_recipes, load_recipe
from bestcompress.zoo import list_models, tiny_model


def test_the_default_pipeline_lists_registered_passes_and_tracing_is_one_of_them():
    assert set(DEFAULT_PIPELINE) <= set(list_passes())
    assert DEFAULT_PIPELINE.index("CanonicalizeNeurons") < DEFAULT_PIPELINE.index("TraceModel") \
        < DEFAULT_PIPELINE.index("BinarizeAttention")
    assert get_pass("TraceModel") is TraceModel


def test_from_recipe_runs_the_passes_the_recipe_switches_on_in_order():
    full = Pipeline.from_recipe(load_recipe("bestformer"), PassContext())
    assert full.names == list(DEFAULT_PIPELINE)
    identity = Pipeline.from_recipe(load_recipe("identity"), PassContext())
    assert identity.names == ["CanonicalizeNeurons", "TraceModel"]
    no_neurons = Pipeline.from_recipe(load_recipe("bestformer", {"neurons.canonicalize": False}), PassContext())
    assert "CanonicalizeNeurons" not in no_neurons.names and "TraceModel" in no_neurons.names


def test_each_pass_is_built_from_its_recipe_section():
    recipe = load_recipe("bestformer", {"attention.map": "qk", "attention.v_threshold": 0.75,
                                        "weights.quantizer": "sign_scaled", "weights.keep_full_precision": ["head"]})
    pipe = Pipeline.from_recipe(recipe, PassContext(recipe=recipe))
    attn = next(p for p in pipe.passes if isinstance(p, BinarizeAttention))
    weights = next(p for p in pipe.passes if isinstance(p, BinarizeWeights))
    assert (attn.map, attn.v_threshold) == ("qk", 0.75)
    assert weights.scaled and weights.keep_patterns == ("head",)


class _Fails(Pass):
    def __init__(self, ctx=None, error=None):
        super().__init__(ctx)
        self.error = error

    def apply(self, model):
        raise self.error


class _Nothing(Pass):
    def apply(self, model):
        return model


class _BreaksGraph(Pass):
    def apply(self, model):  # the first layer reads the last one's output: used before it is defined
        calls = [n for n in model.graph.nodes if n.op == "call_module"]
        calls[0].args = (calls[-1],)
        return model


class _CheckFails(_Nothing):
    def check(self, model):
        raise PassError("its Ensures does not hold")


def _model():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("error", [ValueError("bad value"), KeyError("k"), AttributeError("no attr")])
def test_an_exception_of_any_kind_names_the_pass_and_the_passes_before_it(error):
    pipe = Pipeline([_Nothing(), TraceModel(), _Fails(error=error)])
    with pytest.raises(PassError) as info:
        pipe.apply(_model())
    msg = str(info.value)
    assert msg.startswith("_Fails (after _Nothing, TraceModel) failed: ") and type(error).__name__ in msg
    assert info.value.__cause__ is error


def test_a_user_error_keeps_its_class_and_names_where_it_happened():
    with pytest.raises(DataError, match=r"^_Fails \(the first pass\): the data is wrong\.$"):
        Pipeline([_Fails(error=DataError("the data is wrong."))]).apply(_model())


def test_an_invalid_graph_and_a_failed_check_name_the_pass():
    with pytest.raises(PassError, match=r"_BreaksGraph \(after TraceModel\): left an invalid graph"):
        Pipeline([TraceModel(), _BreaksGraph()]).apply(_model())
    with pytest.raises(PassError, match=r"_CheckFails \(after TraceModel\): its Ensures does not hold"):
        Pipeline([TraceModel(), _CheckFails()]).apply(_model())


def test_trace_pass_records_its_report_and_is_idempotent():
    ctx = PassContext(example_input=torch.rand(2, 4))
    traced = TraceModel(ctx).apply(_model())
    assert isinstance(traced, fx.GraphModule) and ctx.trace_report is not None and traced.bc_input_shape == (4,)
    assert TraceModel(ctx).apply(traced) is traced


# -------------------------------------------------------------------------------- every recipe × every family

@pytest.mark.parametrize("family", list_models())
@pytest.mark.parametrize("recipe_name", list_recipes())
def test_every_registered_recipe_on_every_zoo_family(recipe_name, family):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    recipe = load_recipe(recipe_name)
    x = example_input_for(model, seed=1)
    try:
        result = binarize(model, recipe)
    except ModelError as e:  # a recipe may refuse a family it does not fit, in one sentence naming the pass
        assert recipe_name != "bestformer" and any(p in str(e) for p in DEFAULT_PIPELINE), str(e)
        pytest.skip(f"{recipe_name} refuses {family}: {e}")
    binary = [m for m in result.model.modules() if is_binary_layer(m)]
    assert bool(binary) == recipe.weights.binarize
    with torch.no_grad():
        out = result.model(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    assert out.shape[0] == x.shape[0] and torch.isfinite(out).all()
