"""Issue 27, the model and its accessors: nothing silent, nothing raw.

Two threads tracing one model (every trace runs its body or gets a clear error, never a skipped body); input_ids /
attention_mask / input_size inside a trace are this forward's; NaN / inf assignments refused with the location; one-line
errors for a misspelled accessor, a value used after the trace without ``.save()``, 3-D token ids, a wrongly sized
hidden state, a k beyond the vocabulary, and a wrongly shaped attention assignment (no misleading warning).
"""

import threading
import warnings

import nnsight
import pytest
import torch

from unilens import StandardizedTransformer
from unilens.core.tensors import NonFiniteValueError
from unilens.core.traces import ConcurrentTraceError, UnsavedValueError
from unilens.testing import tiny_model

PROMPTS = ["The cat sat", "A dog barked loudly at night"]


@pytest.fixture(scope="module")
def llama():
    return StandardizedTransformer(*tiny_model("llama"), check=False)


@pytest.fixture(scope="module")
def gpt2():
    return StandardizedTransformer(*tiny_model("gpt2"), check=False)


@pytest.fixture(autouse=True)
def _defaults(llama, gpt2):
    yield
    for model in (llama, gpt2):
        model.__dict__.pop("allow_nonfinite", None)
        model.__dict__.pop("concurrent_traces", None)


def _layer1(model, prompt):
    with model.trace(prompt):
        out = model.layers_output[1].save()
    return out


# --- two threads, one model ---------------------------------------------------------------------------------------

def _hammer(model, traces=20):
    """2 threads x ``traces`` traces of one model; each trace's body assigns a value checked against a one-thread
    reference (a skipped body leaves the sentinel)."""
    ref = {p: _layer1(model, p) for p in PROMPTS}
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(prompt):
        for _ in range(traces):
            out = "sentinel: body skipped"
            try:
                with model.trace(prompt):
                    out = model.layers_output[1].save()
            except ConcurrentTraceError as err:
                result = "refused" if "already running a trace in thread" in str(err) else f"bad message {err}"
            except Exception as err:  # noqa: BLE001 - any raw error is a failure of the test
                result = f"raw {type(err).__name__}: {err}"
            else:
                if isinstance(out, str):
                    result = "skipped"
                else:
                    result = "ok" if torch.equal(out, ref[prompt]) else "wrong value"
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_two_threads_tracing_one_model_each_trace_runs_its_body(llama):
    outcomes = _hammer(llama)
    assert outcomes == ["ok"] * 40, sorted(set(outcomes))


def test_two_threads_in_error_mode_each_trace_runs_or_is_refused_clearly(llama):
    llama.concurrent_traces = "error"
    outcomes = _hammer(llama)
    assert len(outcomes) == 40
    assert set(outcomes) <= {"ok", "refused"}, sorted(set(outcomes))


def _hold_trace(model, entered: threading.Event, release: threading.Event, done: list):
    with model.trace(PROMPTS[0]):
        out = model.layers_output[0].save()
        entered.set()
        release.wait(10)
    done.append(out)


def test_second_thread_gets_clear_error_naming_the_tracing_thread(llama):
    entered, release, done = threading.Event(), threading.Event(), []
    holder = threading.Thread(target=_hold_trace, args=(llama, entered, release, done), name="holder-thread")
    holder.start()
    try:
        assert entered.wait(10)
        llama.concurrent_traces = "error"
        with pytest.raises(ConcurrentTraceError, match="already running a trace in thread 'holder-thread'"):
            with llama.trace(PROMPTS[1]):
                llama.layers_output[0].save()
    finally:
        release.set()
        holder.join()
    assert len(done) == 1 and done[0].shape[0] == 1
    assert isinstance(ConcurrentTraceError("x"), RuntimeError)


def test_second_thread_waits_for_the_running_trace_by_default(llama):
    ref = _layer1(llama, PROMPTS[1])
    entered, release, done = threading.Event(), threading.Event(), []
    holder = threading.Thread(target=_hold_trace, args=(llama, entered, release, done))
    holder.start()
    assert entered.wait(10)
    timer = threading.Timer(0.2, release.set)
    timer.start()
    out = _layer1(llama, PROMPTS[1])  # waits for the holder's trace to end
    holder.join()
    assert done and torch.equal(out, ref)


def test_concurrent_traces_mode_is_checked(llama):
    llama.concurrent_traces = "sometimes"
    with pytest.raises(ValueError, match="concurrent_traces must be one of"):
        _layer1(llama, PROMPTS[0])


def test_direct_generate_from_another_thread_waits_for_the_trace(llama):
    alone = llama.generate(PROMPTS[0], max_new_tokens=2, do_sample=False)
    entered, release, done = threading.Event(), threading.Event(), []
    holder = threading.Thread(target=_hold_trace, args=(llama, entered, release, done))
    holder.start()
    assert entered.wait(10)
    threading.Timer(0.2, release.set).start()
    ids = llama.generate(PROMPTS[0], max_new_tokens=2, do_sample=False)
    holder.join()
    assert done and torch.equal(ids, alone)


# --- per-forward batch state ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_input_ids_inside_a_trace_are_this_forwards(model_type, gpt2, llama):
    model = {"gpt2": gpt2, "llama": llama}[model_type]
    with model.trace("a b c"):
        model.layers_output[0].save()
    with model.trace("Hello, world! x y z"):
        ids = model.input_ids.save()  # read first thing in the body: before this forward started
        mask = model.attention_mask.save()
        shape = nnsight.save(list(model.input_size))
        emb = model.token_embeddings.save()
    expected = model.tokenizer("Hello, world! x y z", return_tensors="pt").input_ids
    assert torch.equal(ids, expected)
    assert mask.shape == ids.shape and shape == list(ids.shape)
    assert emb.shape[1] == ids.shape[1]
    # after the trace: the last forward's
    assert torch.equal(model.input_ids, expected)


def test_input_ids_inside_an_invoke_are_its_rows(gpt2):
    with gpt2.trace(["x", "y y"]):  # a batch of another size and length first
        pass
    with gpt2.trace() as tracer:
        with tracer.invoke("a b c"):
            short = gpt2.input_ids.save()  # before the forward started
        with tracer.invoke("Hello, world! x y z"):
            gpt2.layers_output[0]  # read during the forward
            long = gpt2.input_ids.save()
            mask = gpt2.attention_mask.save()
    expected = gpt2.tokenizer("Hello, world! x y z", return_tensors="pt").input_ids
    assert torch.equal(long, expected) and mask.shape == expected.shape
    abc = gpt2.tokenizer("a b c", return_tensors="pt").input_ids
    assert short.shape == expected.shape and torch.equal(short[:, -abc.shape[1]:], abc)  # left-padded to the batch


def test_next_token_probs_inside_a_right_padded_invoke():
    model = StandardizedTransformer(*tiny_model("gpt2"), check=False, tokenizer_kwargs={"padding_side": "right"})
    with model.trace("a b c"):
        alone = model.next_token_probs.save()
    with model.trace() as tracer:
        with tracer.invoke("a b c"):
            probs = model.next_token_probs.save()
        with tracer.invoke("Hello, world! x y z"):
            pass
    torch.testing.assert_close(probs, alone, atol=1e-5, rtol=0)


def test_steer_after_a_trace_of_another_length_uses_this_forwards_mask(llama):
    v = torch.randn(llama.hidden_size)
    with llama.trace(["The capital of France is", "Hi"]):
        pass
    with llama.trace("A cat sat"):
        llama.steer(layers=0, steering_vector=v, positions=-1)
        steered = llama.layers_output[0].save()
    with llama.trace("A cat sat"):
        plain = llama.layers_output[0].save()
    diff = (steered - plain).abs().sum(-1)[0]
    assert diff[-1] > 0 and torch.all(diff[:-1] == 0)


# --- finite values ----------------------------------------------------------------------------------------------------

def _assign(model, name, layer, bad):
    with model.trace("The cat sat"):
        accessor = getattr(model, name)
        if layer is None:
            value = getattr(model, name)
            setattr(model, name, torch.full_like(value, bad))
        else:
            value = accessor[layer]
            accessor[layer] = torch.full_like(value, bad)
        out = model.logits.save()
    return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name,layer", [
    ("layers_output", 1), ("layers_input", 0), ("mlps_output", 0), ("attention_probabilities", 1),
    ("mlps_post_activation", 0), ("token_embeddings", None),
])
def test_nonfinite_assignment_is_refused_with_its_location(llama, name, layer, bad):
    where = name if layer is None else rf"{name}\[{layer}\]"
    with pytest.raises(NonFiniteValueError, match=rf"tensor assigned to {where} has NaN / inf values.*allow_nonfinite"):
        _assign(llama, name, layer, bad)


def test_nonfinite_position_embeddings_refused(gpt2):
    with pytest.raises(NonFiniteValueError, match="position_embeddings has NaN / inf"):
        _assign(gpt2, "position_embeddings", None, float("nan"))


def test_nonfinite_steering_vector_refused(llama):
    v = torch.zeros(llama.hidden_size)
    v[3] = float("nan")
    with pytest.raises(NonFiniteValueError, match="steer: the steering vector has 1 NaN / inf value"):
        with llama.trace("The cat sat"):
            llama.steer(layers=0, steering_vector=v)


def test_nonfinite_allowed_when_asked(llama):
    llama.allow_nonfinite = True
    logits = _assign(llama, "layers_output", 1, float("nan"))
    assert torch.isnan(logits).all()
    v = torch.full((llama.hidden_size,), float("inf"))
    with llama.trace("The cat sat"):
        llama.steer(layers=0, steering_vector=v)
        out = llama.layers_output[0].save()
    assert torch.isinf(out).any()


def test_finite_assignments_pass(llama):
    with llama.trace("The cat sat"):
        llama.token_embeddings = llama.token_embeddings * 1.0
        llama.layers_output[0] = llama.layers_output[0] * 2
        p = llama.attention_probabilities[1]
        llama.attention_probabilities[1] = p
        out = llama.logits.save()
    assert torch.isfinite(out).all()


# --- one-line errors ------------------------------------------------------------------------------------------------

def test_misspelled_accessor_suggests_the_name(llama):
    with pytest.raises(AttributeError, match=r"no attribute 'layer_output'; did you mean 'layers_output'\?"):
        llama.layer_output  # noqa: B018
    with pytest.raises(AttributeError, match=r"did you mean 'attention_probabilities'\?"):
        llama.attention_probability  # noqa: B018
    assert not hasattr(llama, "no_such_thing_at_all")
    assert llama.layers_output is not None and llama.config is not None  # real names unaffected


def test_value_used_after_the_trace_without_save_is_explained(llama):
    with llama.trace("The cat sat"):
        hidden = llama.layers_output[0]
    with pytest.raises(UnsavedValueError, match=r"'hidden' was assigned inside the trace but not saved.*\.save\(\)"):
        hidden.shape  # noqa: B018
    with pytest.raises(NameError):  # a NameError, as a forgotten save gave before
        hidden + 1
    assert "not saved" in repr(hidden)


def test_unsaved_value_does_not_keep_a_stale_previous_value(llama):
    norm = torch.tensor(123.0)  # bound before the trace
    with llama.trace("The cat sat"):
        norm = llama.layers_output[0].norm()
    with pytest.raises(UnsavedValueError):
        float(norm)


def test_saved_values_and_containers_still_leave_the_trace(llama):
    outs = []
    with llama.trace("The cat sat"):
        a = llama.layers_output[0].save()
        outs.append(llama.layers_output[1].save())
    assert isinstance(a, torch.Tensor) and isinstance(outs[0], torch.Tensor)


def test_three_d_token_ids_refused(llama):
    ids = torch.ones(2, 2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\).*shape \(2, 2, 3\)"):
        with llama.trace(ids):
            llama.layers_output[0].save()
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\)"):
        with llama.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
            llama.layers_output[0].save()
    with llama.trace(torch.ones(1, 3, dtype=torch.long)):
        out = llama.layers_output[0].save()
    assert out.dim() == 3


def test_project_on_vocab_names_the_hidden_size(llama):
    with pytest.raises(ValueError, match=rf"hidden state has shape \(3,\).*hidden size is {llama.hidden_size}"):
        llama.project_on_vocab(torch.zeros(3))
    with pytest.raises(TypeError, match="hidden-state tensor"):
        llama.project_on_vocab([0.0] * llama.hidden_size)
    assert llama.project_on_vocab(torch.zeros(llama.hidden_size)).shape[-1] == llama.vocab_size


def test_topk_closest_tokens_k_beyond_the_vocabulary(llama):
    h = torch.randn(llama.hidden_size)
    with pytest.raises(ValueError, match=rf"k=1000000 is outside 1\.\.{llama.vocab_size}"):
        llama.get_topk_closest_tokens(h, k=10**6)
    with pytest.raises(ValueError, match="k=0"):
        llama.get_topk_closest_tokens(h, k=0)
    with pytest.raises(ValueError, match="hidden size is"):
        llama.get_topk_closest_tokens(torch.zeros(3), k=2)
    assert len(llama.get_topk_closest_tokens(h, k=3)) == 3


def test_wrongly_shaped_attention_assignment_gives_only_the_shape_error(llama):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"cannot set attention_probabilities\[0\] to a tensor of shape \(3,\)"):
            with llama.trace("a b c"):
                llama.attention_probabilities[0]
                llama.attention_probabilities[0] = torch.zeros(3)
    assert not [w for w in caught if "not supported by the hookable attention" in str(w.message)]
    # the hookable path still reports a class that computes no probabilities on a forward that completed
    with llama.trace("a b c"):
        p = llama.attention_probabilities[0].save()
    assert p.shape[-1] == 3


def test_a_call_from_inside_the_trace_body_does_not_wait_on_its_own_trace(llama):
    """The body runs in a greenlet of the tracing thread: the gate is re-entrant there (no self-deadlock)."""
    done = []

    def body():
        with llama.trace("The cat sat"):
            llama.layers_output[0]  # the forward is running
            logits = llama(torch.tensor([[5, 6, 7]])).logits  # an ad hoc forward, inside the trace
            n = nnsight.save(logits.shape[1])
        done.append(n)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive() and done == [3]


@pytest.mark.parametrize("side", ["left", "right"])
def test_token_activations_idx_beyond_a_prompt_is_refused(side):
    import unilens.compat.nnsight_utils as nu

    model = StandardizedTransformer(*tiny_model("llama"), check=False, tokenizer_kwargs={"padding_side": side})
    prompts = ["The capital of France is", "Hi"]
    short = len(model.tokenizer("Hi").input_ids)
    with pytest.raises(ValueError, match=rf"idx=-{short + 1} is not a token of prompt 1, which has {short} tokens"):
        nu.get_token_activations(model, prompts, layers=[0], idx=-(short + 1))
    padding_column = 0 if side == "left" else short
    with pytest.raises(ValueError, match=rf"idx={padding_column} is not a token of prompt 1.*{side}-padded"):
        nu.get_token_activations(model, prompts, layers=[0], idx=padding_column)
    # every prompt has these: the same values as each prompt alone
    for idx in (-1, -short):
        acts = nu.get_token_activations(model, prompts, layers=[0], idx=idx)
        alone = nu.get_token_activations(model, prompts[1:], layers=[0], idx=idx)
        torch.testing.assert_close(acts[:, 1], alone[:, 0], atol=1e-5, rtol=0)
