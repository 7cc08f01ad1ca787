"""Remote mode through the offline loopback server (a plain nnsight model with unilens hidden) and nnsight's
remote="local": every supported accessor equals the local result exactly (oracle: the local model, itself checked
against HF at load), every refused one is refused before anything is serialized, and the interventions match."""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from pathlib import Path

import nnsight
import pytest
import torch

from unilens import (
    StandardizedTransformer,
    activation_patching,
    cache_activations,
    logit_lens,
)
from unilens.core.names import ATTENTION, CATALOGUE
from unilens.hooks.reads import forward_order
from unilens.model.remote import (
    REMOTE_TABLE_NAMES,
    Loopback,
    RemoteUnsupportedError,
    check_block,
    meta_structure,
)
from unilens.testing import ZOO_REQUIRED, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Hi there"]  # two lengths: a padded batch
# module inputs / outputs: bit-equal to the local model. The attention names are served too, from the deployment's
# own attention call (tests/test_remote_attention.py): there the server's kernel (sdpa) and the local hookable path
# differ by rounding, so reading them would also move every later module output off bit-equality here.
SUPPORTED = [n for n in REMOTE_TABLE_NAMES if CATALOGUE[n].remote is None and CATALOGUE[n].kind != ATTENTION]
REFUSED = [n for n in REMOTE_TABLE_NAMES if CATALOGUE[n].remote is not None]


def _layers(model, name: str) -> list[int]:
    arch = model.architecture
    if name.startswith("attentions"):
        return arch.attention_layers
    if name == "mlps_input":
        return [i for i, p in enumerate(arch.layers) if p.mlp_in is not None]
    if name == "mlps_output":
        return [i for i, p in enumerate(arch.layers) if p.mlp_out is not None]
    return list(range(model.num_layers))


def _read_all(model, order: dict) -> dict[str, torch.Tensor]:
    """Every supported accessor at every layer that has it, in ONE forward: per-layer reads sorted by the local
    model's recorded forward order (``unilens.order.forward_order``; remote mode cannot record one)."""
    whole = ("token_embeddings", "position_embeddings", "logits", "next_token_probs")
    per_layer = [(n, i) for n in SUPPORTED if n not in whole for i in _layers(model, n)]
    per_layer.append(("token_embeddings", None))
    if model.architecture.position_embed_path is not None:  # learned absolute positions (GPT-2, OPT)
        per_layer.append(("position_embeddings", None))
    per_layer.sort(key=lambda loc: order[loc])
    got: dict[str, torch.Tensor] = {}
    with torch.no_grad(), model.trace(PROMPTS):
        for name, i in per_layer:
            value = getattr(model, name) if i is None else getattr(model, name)[i]
            got[name if i is None else f"{name}.{i}"] = value.save()
        got["logits"] = model.logits.save()
        got["next_token_probs"] = model.next_token_probs.save()
        got = nnsight.save(got)  # a remote request returns saved names only: the dict itself
    return got


def _pair(model_type: str, target: str):
    """(local model, remote-mode model, loopback server or None) on separately built copies of the same weights."""
    hf, tok = tiny_model(model_type)
    local = StandardizedTransformer(hf, tokenizer=tok)
    if target == "loopback":  # the NDIF way: the client holds the structure on the meta device, from the config
        server = Loopback(tiny_model(model_type)[0], tok)
        return local, StandardizedTransformer(hf.config, tokenizer=tok, remote=server), server
    return local, StandardizedTransformer(tiny_model(model_type)[0], tokenizer=tok, remote="local"), None


def _assert_same(local: dict, remote: dict, tokenizer) -> None:
    """Bit-equal at every real token. Padded positions (queries that see no real key) must only be finite: there
    unilens's local attention path may differ from the model's own kernel, which the server runs (Falcon's sdpa),
    as unilens's conformance rules allow; the remote values there equal plain HF's."""
    real = tokenizer(PROMPTS, return_tensors="pt", padding=True)["attention_mask"].bool()  # (batch, seq)
    assert local.keys() == remote.keys()
    for key in local:
        a, b = local[key], remote[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if a.shape[:2] == real.shape and not torch.equal(a, b):
            assert torch.isfinite(b).all(), key
            a, b = a[real], b[real]
        assert torch.equal(a, b), f"{key}: max diff {(a - b).abs().max():.3g}"


def _pre_activation(m):
    with m.trace(PROMPTS):
        m.mlps_pre_activation[0].save()


def _resid_mid(m):
    with m.trace(PROMPTS):
        m.layers_resid_mid[0].save()


def _assign_probabilities(m):
    with m.trace(PROMPTS):
        m.attention_probabilities[0] = m.attention_probabilities[0] * 0


# refused before anything is serialized or sent: hook points (none on the server) and attention edits (read-only)
REFUSED_BLOCKS = {"mlps_pre_activation": _pre_activation, "layers_resid_mid": _resid_mid,
                  "attention_probabilities cannot be assigned": _assign_probabilities}


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_loopback_accessors_equal_local(model_type):
    local, remote, server = _pair(model_type, "loopback")
    assert server.requests == 1  # the load check: one small remote trace
    assert {p.device.type for p in remote._module.parameters()} == {"meta"}
    # discovered from the meta structure, data-flow probes on a one-layer random copy: as the local build found
    assert remote.architecture == local.architecture
    assert not any(n.endswith("unilens_hooks") for n, _ in server.server._module.named_modules())
    order = forward_order(local)
    _assert_same(_read_all(local, order), _read_all(remote, order), local.tokenizer)
    for name in REFUSED:  # every refused name of the table, by the static scan of the block
        with pytest.raises(RemoteUnsupportedError, match=name):
            check_block(remote, type("Block", (), {"node": __import__("ast").parse(f"x = model.{name}[0].save()")}))
    for name, block in REFUSED_BLOCKS.items():  # refused before anything is serialized or sent
        sent = server.requests
        with pytest.raises(RemoteUnsupportedError, match=name):
            block(remote)
        assert server.requests == sent


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2", "opt"])
def test_nnsight_local_simulation_equals_local(model_type):
    local, remote, _ = _pair(model_type, "local")
    order = forward_order(local)
    _assert_same(_read_all(local, order), _read_all(remote, order), local.tokenizer)
    with pytest.raises(RemoteUnsupportedError, match="mlps_pre_activation"):
        with remote.trace(PROMPTS):
            remote.mlps_pre_activation[0].save()
    # the dry run deserialized unilens's classes in this process: the live ones are untouched
    StandardizedTransformer(*tiny_model("gpt2"))


def test_refusal_is_static_and_names_the_feature():
    class Block:
        node = __import__("ast").parse("x = model.attentions[0].unilens_hooks.probabilities.output.save()")

    with pytest.raises(RemoteUnsupportedError, match="unilens_hooks.*hook points.*attention_probabilities"):
        check_block(None, Block())


def test_refused_methods_and_bad_options():
    hf, tok = tiny_model("llama")
    server = Loopback(tiny_model("llama")[0], tok)
    with pytest.warns(UserWarning, match="check=False"):
        model = StandardizedTransformer(hf, tokenizer=tok, remote=server, check=False)
    assert server.requests == 0  # check=False: no load-time request
    with pytest.raises(TypeError, match="remote= takes"):
        StandardizedTransformer(hf, tokenizer=tok, remote=3)
    with pytest.raises(TypeError, match="dtype"):
        StandardizedTransformer(hf, tokenizer=tok, remote=server, dtype=torch.float16)
    with pytest.raises(ValueError, match="remote mode"):
        local = StandardizedTransformer(*tiny_model("llama"))
        with local.trace("Hi", remote=True):
            local.logits.save()
    with pytest.raises(ValueError, match="unilens's hook points"):
        Loopback(local.module_accessor.model, tok)
    with pytest.raises(ValueError, match=r"attention_scores\[0\] can only be read inside"):
        model.attention_scores[0]  # served in a trace (on the server), not outside one
    with pytest.raises(RemoteUnsupportedError, match="weights"):
        model.weights[0].W_Q
    with pytest.raises(RemoteUnsupportedError, match="generat"):
        model.generate("Hi", max_new_tokens=2)
    with pytest.raises(RemoteUnsupportedError, match="mlps_pre_activation.*hook_points"):
        model.read("Hi", ["mlps_pre_activation.0"])
    assert server.requests == 0


def test_interventions_through_loopback_equal_local():
    hf, tok = tiny_model("llama")
    local = StandardizedTransformer(hf, tokenizer=tok)
    server = Loopback(tiny_model("llama")[0], tok)
    remote = StandardizedTransformer(tiny_model("llama")[0], tokenizer=tok, remote=server)

    a, b = logit_lens(local, PROMPTS), logit_lens(remote, PROMPTS)
    assert torch.equal(a, b)
    assert torch.equal(logit_lens(local, PROMPTS, all_positions=True), logit_lens(remote, PROMPTS, all_positions=True))

    v = torch.randn(local.hidden_size, generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, model in (("local", local), ("remote", remote)):
        with torch.no_grad(), model.trace(PROMPTS):
            model.steer(layers=[0, 1], steering_vector=v, factor=4.0, positions=-1)
            out = model.logits.save()
        logits[name] = out
    assert torch.equal(logits["local"], logits["remote"])

    token = tok(" Paris").input_ids[0]
    metric = lambda lg: lg[:, -1, token]  # noqa: E731
    before = server.requests
    remote_effect = activation_patching(remote, "The capital of France is", "The capital of Italy is", metric,
                                        progress=False)
    assert server.requests - before <= 3  # clean activations + batched patched runs
    # remote runs every patched row the plain way (nothing cached between requests): the same plan locally
    plain = activation_patching(local, "The capital of France is", "The capital of Italy is", metric,
                                progress=False, reuse_prefix=False, stagger=False)
    assert torch.equal(remote_effect, plain)
    default = activation_patching(local, "The capital of France is", "The capital of Italy is", metric,
                                  progress=False)
    torch.testing.assert_close(remote_effect, default, rtol=0, atol=1e-6)  # local's resumed plan: rounding only

    texts = ["The cat sat on the mat", "Hello", "A third text here"]
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        names = ["layers_output.*", "mlps_output.1", "logits"]
        s_local = cache_activations(local, texts, names, d1, batch_size=2, progress=False)
        s_remote = cache_activations(remote, texts, names, d2, batch_size=2, progress=False)
        assert s_local.names == s_remote.names
        for name in s_local.names:
            assert torch.equal(s_local[name], s_remote[name]), name
        with pytest.raises(RemoteUnsupportedError):
            cache_activations(remote, texts, ["attention_probabilities.0"], d2 + "x", progress=False)


def test_probe_copy_is_one_layer_and_small():
    from unilens.arch.discovery import discover
    from unilens.model.remote import probe_copy

    hf, _ = tiny_model("llama", num_hidden_layers=4)
    structure = meta_structure(hf.config)
    small, kept = probe_copy(structure, discover(structure))
    assert kept == 1 and len(small.model.layers) == 1


def test_meta_structure_has_no_weights_and_same_architecture():
    hf, tok = tiny_model("qwen2")
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        tok.save_pretrained(folder)
        structure = meta_structure(folder)
        assert {p.device.type for p in structure.parameters()} == {"meta"}
        server = Loopback(folder)
        remote = StandardizedTransformer(folder, remote=server)
        local = StandardizedTransformer(folder)
        assert remote.architecture == local.architecture
        assert {p.device.type for p in remote._module.parameters()} == {"meta"}
        order = forward_order(local)
        _assert_same(_read_all(local, order), _read_all(remote, order), local.tokenizer)
        # model.read: the forward order recorded on the meta structure, the one forward on the server
        names = ["logits", "mlps_output.1", "layers_input.0", "attentions_output.1"]
        got, want = remote.read(PROMPTS, names), local.read(PROMPTS, names)
        assert list(got) == names and all(torch.equal(got[n], want[n]) for n in names)


@pytest.fixture(scope="module")
def smollm2():
    from unilens import load_default

    return load_default()


def test_smollm2_through_loopback(smollm2):
    from unilens.arch.loading import default_model_path, gguf_cache_dir

    folder = gguf_cache_dir(default_model_path())
    server = Loopback(folder, dtype=torch.float32)
    remote = StandardizedTransformer(folder, remote=server)  # meta structure + one remote load check
    assert remote.architecture == smollm2.architecture
    order = forward_order(smollm2)
    _assert_same(_read_all(smollm2, order), _read_all(remote, order), smollm2.tokenizer)
    assert torch.equal(logit_lens(smollm2, PROMPTS), logit_lens(remote, PROMPTS))
    with torch.no_grad(), remote.trace("The capital of France is"):
        probs = remote.next_token_probs.save()
    paris = smollm2.tokenizer(" Paris").input_ids[0]
    assert probs[0].argmax() == paris and 0.7 < float(probs[0, paris]) < 0.85


def test_docs_table_is_current(capsys):
    spec = importlib.util.spec_from_file_location("remote_table", ROOT / "tools" / "remote_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--check"]) == 0, capsys.readouterr().err
    assert "| llama | yes | yes |" in (ROOT / "docs" / "remote.md").read_text()


def test_eager_deployment_attention_through_source_matches_local_probabilities():
    """The documented route to attention remotely: an eager deployment's attention function returns the
    probabilities; read through nnsight's .source, they match the local hookable path."""
    hf, tok = tiny_model("llama")
    local = StandardizedTransformer(hf, tokenizer=tok)
    server = Loopback(tiny_model("llama")[0], tok, attn_implementation="eager")
    remote = StandardizedTransformer(tiny_model("llama")[0], tokenizer=tok, remote=server)
    with torch.no_grad(), remote.trace(PROMPTS):
        weights = remote.attentions[1].source.attention_interface_1.output[1].save()  # (batch, heads, query, key)
    with torch.no_grad(), local.trace(PROMPTS):
        probs = local.attention_probabilities[1].save()
    assert weights.shape == probs.shape
    torch.testing.assert_close(weights, probs, rtol=0, atol=1e-6)


def test_ndif_mode_builds_offline_and_refuses_before_any_network():
    """remote=True builds from a folder with no weights and no request (check=False); a refused accessor is refused
    before nnsight's RemoteBackend is reached (no connection is attempted: the machine is offline)."""
    hf, tok = tiny_model("llama")
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        tok.save_pretrained(folder)
        with pytest.warns(UserWarning, match="check=False"):
            model = StandardizedTransformer(folder, remote=True, check=False)
        assert {p.device.type for p in model._module.parameters()} == {"meta"}
        assert model.architecture == StandardizedTransformer(hf, tokenizer=tok, check=False).architecture
        assert model._remoteable_class().__name__ == "TransformersModel"  # the class NDIF keys deployments by
        with pytest.raises(RemoteUnsupportedError, match="mlps_pre_activation"):
            _pre_activation(model)


def test_session_is_one_request():
    """An nnsight session through the loopback: two traces (clean read, patched run) in ONE request, the clean
    activation never leaving the server; equal to the same two traces locally."""
    hf, tok = tiny_model("llama")
    local = StandardizedTransformer(hf, tokenizer=tok)
    server = Loopback(tiny_model("llama")[0], tok)
    remote = StandardizedTransformer(tiny_model("llama")[0], tokenizer=tok, remote=server, check=False)
    with remote.session():
        with remote.trace("The capital of France is"):
            clean = remote.layers_output[0].save()
        with remote.trace("The capital of Italy is"):
            remote.layers_output[0] = clean
            patched = remote.logits.save()
    assert server.requests == 1
    with local.trace("The capital of France is"):
        local_clean = local.layers_output[0].save()
    with local.trace("The capital of Italy is"):
        local.layers_output[0] = local_clean
        expected = local.logits.save()
    assert torch.equal(patched, expected)
    with pytest.raises(RemoteUnsupportedError, match="mlps_pre_activation"):
        with remote.session():
            with remote.trace("Hi"):
                remote.mlps_pre_activation[0].save()
    assert server.requests == 1


def test_containers_filled_inside_a_trace_come_back():
    """The idiom "build a dict / list outside, fill it inside" (unilens's helpers use it) works remotely: the block
    sent ends by saving each container it fills. nnterp's helpers run on a remote-mode model as on a local one."""
    from unilens.compat import nnsight_utils as nu

    hf, tok = tiny_model("llama")
    local = StandardizedTransformer(hf, tokenizer=tok)
    server = Loopback(tiny_model("llama")[0], tok)
    remote = StandardizedTransformer(tiny_model("llama")[0], tokenizer=tok, remote=server, check=False)
    outputs: list[torch.Tensor] = []
    by_layer: dict[int, torch.Tensor] = {}
    with torch.no_grad(), remote.trace(PROMPTS):
        for i in range(remote.num_layers):
            outputs.append(remote.layers_output[i].save())
            by_layer[i] = remote.layers_input[i + 1].save() if i + 1 < remote.num_layers else remote.logits.save()
    with torch.no_grad(), local.trace(PROMPTS):
        expected = nnsight.save([local.layers_output[i] for i in range(local.num_layers)])
    assert len(outputs) == local.num_layers and all(torch.equal(a, b) for a, b in zip(outputs, expected))
    assert torch.equal(by_layer[0], outputs[0])  # layers_input[1] is layers_output[0]
    assert torch.equal(nu.compute_next_token_probs(remote, PROMPTS, remote=True),
                       nu.compute_next_token_probs(local, PROMPTS))
    assert torch.equal(nu.get_token_activations(remote, PROMPTS), nu.get_token_activations(local, PROMPTS))


# ------------------------------------------------------------------------------------------------------------------
# Request timeout and safe replies (issue 27)
# ------------------------------------------------------------------------------------------------------------------


def _remote_llama(**kwargs):
    hf, tok = tiny_model("llama")
    server = Loopback(tiny_model("llama")[0], tok)
    return StandardizedTransformer(tiny_model("llama")[0], tokenizer=tok, remote=server, check=False, **kwargs), server


def test_request_timeout_cancels_a_looping_block():
    import time

    from unilens.model.remote import RemoteTimeoutError

    local = StandardizedTransformer(*tiny_model("llama"))
    with pytest.warns(UserWarning, match="check=False"):
        remote, server = _remote_llama(remote_timeout=1)
    start = time.monotonic()
    with pytest.raises(RemoteTimeoutError) as err:
        with remote.trace("Hi"):
            remote.layers_output[0].save()
            until = time.time() + 60  # without a timeout the request returns after 60 s, not after 1 s
            while time.time() < until:
                pass
    assert time.monotonic() - start < 20  # cancelled, not run to its end
    assert isinstance(err.value, TimeoutError) and "\n" not in str(err.value)
    assert "remote_timeout=1 s" in str(err.value) and "remote_timeout=None" in str(err.value)
    # the server is usable at once, and right (a normal request takes ~1 s here on a loaded machine: a longer limit)
    with torch.no_grad(), remote.trace(PROMPTS, remote_timeout=60):
        got = remote.logits.save()
    with torch.no_grad(), local.trace(PROMPTS):
        want = local.logits.save()
    assert torch.equal(got, want)
    # per trace: a shorter limit on a model whose own limit is the default
    with pytest.warns(UserWarning, match="check=False"):
        patient, _ = _remote_llama()
    with pytest.raises(RemoteTimeoutError, match="remote_timeout=0.5 s"):
        with patient.trace("Hi", remote_timeout=0.5):
            patient.layers_output[0].save()
            until = time.time() + 60
            while time.time() < until:
                pass
    with patient.trace("Hi", remote_timeout=None):  # no limit, and a normal block
        h = patient.layers_output[0].save()
    assert h.shape[-1] == patient.hidden_size


def test_remote_timeout_is_checked():
    hf, tok = tiny_model("llama")
    with pytest.raises(TypeError, match="remote_timeout= applies to remote mode only"):
        StandardizedTransformer(hf, tokenizer=tok, remote_timeout=5)
    with pytest.raises(ValueError, match="positive number"):
        StandardizedTransformer(hf, tokenizer=tok, remote=Loopback(tiny_model("llama")[0], tok), remote_timeout=-1)
    with pytest.raises(TypeError, match="positive number"):
        StandardizedTransformer(hf, tokenizer=tok, remote=Loopback(tiny_model("llama")[0], tok),
                                remote_timeout="10")
    with pytest.warns(UserWarning, match="check=False"):
        remote, server = _remote_llama()
    with pytest.raises(ValueError, match="positive number"):
        with remote.trace("Hi", remote_timeout=0):
            remote.logits.save()
    assert server.requests == 0


def test_ndif_requests_carry_the_timeout(monkeypatch):
    """remote=True: the model's remote_timeout (or the trace's) reaches the NDIF backend, which unilens builds as
    nnsight's RemoteBackend with a deadline and safe reply reading (nothing is sent: the backend is stubbed)."""
    from unilens.model import remote as remote_module

    seen = []
    monkeypatch.setattr(remote_module._NdifBackend, "__call__", lambda self, tracer: seen.append(self.timeout) or {})
    monkeypatch.setattr(StandardizedTransformer, "to_model_key", lambda self: "tiny-llama")  # a folder has no hub key
    hf, tok = tiny_model("llama")
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        tok.save_pretrained(folder)
        with pytest.warns(UserWarning, match="check=False"):
            model = StandardizedTransformer(folder, remote=True, check=False, remote_timeout=42)
        with model.trace("Hi"):
            model.logits.save()
        with model.trace("Hi", remote_timeout=7):
            model.logits.save()
        with pytest.warns(UserWarning, match="check=False"):
            default = StandardizedTransformer(folder, remote=True, check=False)
        with default.trace("Hi"):
            default.logits.save()
    assert seen == [42.0, 7.0, remote_module.DEFAULT_REMOTE_TIMEOUT]


class _FakeSocket:
    """A /subscribe websocket: the session id, then nothing for ``silent`` seconds, then ``frames``."""

    def __init__(self, frames: list, silent: float):
        import time

        self.frames, self.timeout, self.until = list(frames), None, time.monotonic() + silent
        self.sent_session = False

    def settimeout(self, value):
        self.timeout = value

    def recv(self):
        import json
        import time

        import websocket

        if not self.sent_session:
            self.sent_session = True
            return json.dumps({"session_id": "s1"})
        wait = self.until - time.monotonic()
        if wait > 0:
            if self.timeout is not None and self.timeout < wait:
                time.sleep(self.timeout)
                raise websocket.WebSocketTimeoutException("timed out")
            time.sleep(wait)
        return self.frames.pop(0)

    def close(self):
        pass


def test_ndif_backend_deadline_and_safe_frames(monkeypatch):
    import io
    import time

    import websocket
    from nnsight.schema.request import RequestModel
    from nnsight.schema.response import ResponseModel, Status

    from unilens.model.remote import RemoteTimeoutError, _NdifBackend

    import zstandard

    result = io.BytesIO()
    torch.save({"h": torch.arange(3.0)}, result)
    data = zstandard.ZstdCompressor().compress(result.getvalue())  # requests are compressed (nnsight's default)
    done = ResponseModel(id="job-7", status=Status.COMPLETED, data=data).pickle()  # a binary frame
    monkeypatch.setattr(_NdifBackend, "_serialize", lambda self, tracer: b"request")
    monkeypatch.setattr(_NdifBackend, "_post", lambda self, request, blob: ResponseModel(id="job-7",
                                                                                          status=Status.RECEIVED))
    socket = {}
    monkeypatch.setattr(websocket, "create_connection", lambda url, **kw: socket["s"])

    socket["s"] = _FakeSocket([done], silent=60)  # the job never completes in time
    backend = _NdifBackend("key", host="http://ndif.invalid", timeout=0.5)
    start = time.monotonic()
    with pytest.raises(RemoteTimeoutError, match="NDIF job job-7 did not complete within remote_timeout=0.5 s"):
        backend.request(RequestModel(model_key="key"), None)
    assert time.monotonic() - start < 5

    socket["s"] = _FakeSocket([done], silent=0.3)  # completes: the result is read from the binary frame
    backend = _NdifBackend("key", host="http://ndif.invalid", timeout=30)
    backend.compress = True
    got = backend.request(RequestModel(model_key="key"), None)
    assert torch.equal(got["h"], torch.arange(3.0))


class _Payload:
    """What a malicious server could put in a reply: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_reply_carrying_a_pickle_payload_is_refused(tmp_path, monkeypatch):
    import io

    import zstandard
    from nnsight.schema.response import ResponseModel, Status

    from unilens.model.remote import RemoteReplyError, _NdifBackend, load_reply

    marker = tmp_path / "ran"
    evil = io.BytesIO()
    torch.save({"h": torch.ones(2), "x": _Payload(marker)}, evil)
    with pytest.warns(UserWarning, match="check=False"):
        remote, server = _remote_llama()
    monkeypatch.setattr(server, "run", lambda blob, timeout=None: evil.getvalue())  # a compromised server
    with pytest.raises(RemoteReplyError) as err:
        with remote.trace("Hi"):
            h = remote.logits.save()
    assert "posix.system" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    # NDIF's routes: the downloaded result (zstd-compressed), a binary status frame (pickle protocol 4)
    backend = _NdifBackend("key", host="http://ndif.invalid")
    backend.compress = True
    with pytest.raises(RemoteReplyError, match="posix.system"):
        backend.finalize(zstandard.ZstdCompressor().compress(evil.getvalue()))
    with pytest.raises(RemoteReplyError, match="posix.system"):
        _NdifBackend.parse(ResponseModel(id="j", status=Status.COMPLETED, data=_Payload(marker)).pickle())
    evil4 = io.BytesIO()
    torch.save([_Payload(marker)], evil4, pickle_protocol=4)
    with pytest.raises(RemoteReplyError, match="posix.system"):
        load_reply(evil4.getvalue())
    with pytest.raises(RemoteReplyError, match="not a torch.save archive"):
        load_reply(b"<html>502 Bad Gateway</html>")
    assert not marker.exists()


def test_saved_values_of_every_kind_come_back():
    """Replies are read with weights_only=True: the values a block saves (tensors, numbers, strings, None,
    containers, slices, model.output with its cache) come back as they are locally."""
    import io

    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from unilens.model.remote import load_reply

    local = StandardizedTransformer(*tiny_model("llama"))
    with pytest.warns(UserWarning, match="check=False"):
        remote, _ = _remote_llama()
    values = {}
    for name, model in (("local", local), ("remote", remote)):
        with torch.no_grad(), model.trace(PROMPTS):
            plain = nnsight.save([1, 2.5, "s", None, (3, True), {"k": slice(1, 4)}, range(3), frozenset({1})])
            out = model.output.save()
        values[name] = (plain, out)
    (plain, out), (want_plain, want_out) = values["remote"], values["local"]
    assert plain == want_plain
    assert type(out) is CausalLMOutputWithPast and isinstance(out.cache, DynamicCache)
    assert torch.equal(out.logits, want_out.logits)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(out.cache.layers, want_out.cache.layers))
    # a reply pickled with protocol 4 (torch's weights-only unpickler cannot parse it): the restricted reader
    buffer = io.BytesIO()
    torch.save({"o": want_out, "b": b"bytes", "v": want_plain}, buffer, pickle_protocol=4)
    back = load_reply(buffer.getvalue())
    assert type(back["o"]) is CausalLMOutputWithPast and torch.equal(back["o"].logits, want_out.logits)
    assert back["b"] == b"bytes" and back["v"] == want_plain
