"""The continuous-batching engine in-process: greedy ids per request equal PeftModel.generate with that adapter
alone (LoRA, DoRA, modules_to_save, rsLoRA, the bare base; full-precision and NF4 bases), while requests join and
leave the batch at different steps; seeded sampling does not depend on the batch; cancel frees the slot; adapters
load and unload between steps."""

import time

import pytest

from lorakit.serve.engine import BASE, Engine, Request, SamplingParams, _find_stop, _held
from tests.serve.conftest import PROMPTS, TINY, reference_ids

NEW = 10


def load(adapter_root, names, quantization="none"):
    from lorakit import PeftModel
    from lorakit.train.config import QuantizationConfig
    from lorakit.train.evaluate import load_base_model

    model, tok = load_base_model(str(TINY), "float32", QuantizationConfig(method=quantization))
    model = PeftModel.from_pretrained(model, adapter_root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_root / name, adapter_name=name)
    return model, tok


class Collect:
    """A request's events, as the HTTP layer would receive them."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def ids(self):
        return [t for e in self.events for t in e.token_ids]

    @property
    def text(self):
        return "".join(e.text for e in self.events)

    @property
    def finish(self):
        return self.events[-1].finish_reason if self.events and self.events[-1].finish_reason else None


def submit(engine, rid, adapter, ids, **params):
    out = Collect()
    engine.submit(Request(rid, adapter, adapter, ids, SamplingParams(**{"max_tokens": NEW, "temperature": 0.0,
                                                                        **params}), out))
    return out


def drain(engine, limit=500):
    for _ in range(limit):  # bounded: a hang fails the test instead of the run
        if not (engine._rows or engine._waiting):
            return
        engine.step()
    raise AssertionError("the engine did not finish its requests")


@pytest.mark.parametrize(("quantization", "names"), [("none", ["ad1", "ad2", "ad3", "ad4"]), ("nf4", ["ad1", "ad2"])])
def test_joins_and_leaves_give_each_adapter_its_generate_ids(adapter_root, quantization, names):
    model, tok = load(adapter_root, names, quantization)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    refs = {n: reference_ids(adapter_root / n, prompts, NEW, quantization) for n in names}
    refs[BASE] = reference_ids(None, prompts, NEW, quantization)
    assert len({tuple(map(tuple, r)) for r in refs.values()}) == len(refs), "adapters must change the output"
    engine = Engine(model, tok, max_batch_size=6)  # 20 requests: a queue, and rows joining while others decode
    outs = {}
    for i, (name, p) in enumerate((n, p) for n in [*names, BASE] for p in range(len(prompts))):
        outs[name, p] = submit(engine, f"r{i}", name, prompts[p])
        if i % 3 == 0:
            engine.step()
    drain(engine)
    for (name, p), out in outs.items():
        assert out.ids == refs[name][p], (name, p)
        assert out.finish == ("stop" if refs[name][p][-1] == tok.eos_token_id else "length")
        assert out.text == tok.decode(refs[name][p], skip_special_tokens=True)
    assert engine.metrics["generation_tokens"] == sum(len(r) for rs in refs.values() for r in rs)


def test_seeded_sampling_does_not_depend_on_the_batch(adapter_root):
    model, tok = load(adapter_root, ["ad1", "ad2"])
    ids = tok(PROMPTS[0])["input_ids"]
    engine = Engine(model, tok)
    alone = submit(engine, "alone", "ad1", ids, temperature=0.9, top_p=0.8, seed=3, ignore_eos=True)
    drain(engine)
    others = [submit(engine, f"o{i}", "ad2", ids, temperature=1.0, seed=i, ignore_eos=True) for i in range(3)]
    batched = submit(engine, "batched", "ad1", ids, temperature=0.9, top_p=0.8, seed=3, ignore_eos=True)
    drain(engine)
    assert len(alone.ids) == NEW and alone.ids == batched.ids
    assert len({tuple(o.ids) for o in others}) > 1, "different seeds sample differently"


def test_cancel_frees_the_slot_for_a_waiting_request(adapter_root):
    model, tok = load(adapter_root, ["ad1"])
    ids = tok(PROMPTS[0])["input_ids"]
    engine = Engine(model, tok, max_batch_size=1)
    long = submit(engine, "long", "ad1", ids, max_tokens=200, ignore_eos=True)
    waiting = submit(engine, "next", "ad1", ids, max_tokens=3, ignore_eos=True)
    engine.step()  # prefill (token 1) and a decode step (token 2)
    engine.step()
    assert engine.batch_size == 1 and engine.queue_length == 1
    engine.cancel("long")
    engine.step()
    assert long.finish == "abort" and len(long.ids) == 3
    assert engine.batch_size == 1 and engine.queue_length == 0  # "next" took the slot
    drain(engine)
    assert waiting.finish == "length" and len(waiting.ids) == 3
    assert engine.metrics["requests"] == {("ad1", "abort"): 1, ("ad1", "length"): 1}


def test_stop_strings_end_the_output_and_are_not_sent(adapter_root):
    model, tok = load(adapter_root, ["ad1"])
    ids = tok(PROMPTS[2])["input_ids"]
    engine = Engine(model, tok)
    full = submit(engine, "full", "ad1", ids, max_tokens=20, ignore_eos=True)
    drain(engine)
    stop = full.text[3:5]
    assert stop and full.text.find(stop) == 3
    cut = submit(engine, "cut", "ad1", ids, max_tokens=20, ignore_eos=True, stop=["never there", stop])
    drain(engine)
    assert cut.text == full.text[:3] and cut.finish == "stop"
    assert cut.ids == full.ids[: len(cut.ids)] and len(cut.ids) < len(full.ids)


def test_stop_helpers():
    assert _find_stop("hello world", ["o w", "xyz"], 0) == 4
    assert _find_stop("hello world", ["xyz"], 0) is None
    assert _held("hello wo", ["world"]) == 2  # "wo" may begin "world": held back
    assert _held("hello", ["xyz"]) == 0
    assert _held("caf\ufffd", []) == 1  # an incomplete UTF-8 character


def test_adapters_load_and_unload_between_steps(adapter_root):
    model, tok = load(adapter_root, ["ad1"])
    ids = tok(PROMPTS[0])["input_ids"]
    engine = Engine(model, tok)
    running = submit(engine, "running", "ad1", ids, max_tokens=30, ignore_eos=True)
    engine.step()
    loaded = engine.call(lambda: engine.load_adapter("ad5", str(adapter_root / "ad5")))
    with pytest.raises(KeyError):  # not served until the engine thread ran the load, between two steps
        submit(engine, "early", "ad5", ids)
    engine.step()
    assert loaded.done() and loaded.exception() is None
    new = submit(engine, "new", "ad5", ids, max_tokens=20, ignore_eos=True)
    engine.step()
    assert "ad5" in engine.adapters and "ad5" in model.peft_config
    engine.unload_adapter("ad5")  # "new" still runs: the weights stay until it leaves
    assert "ad5" not in engine.adapters and "ad5" in model.peft_config
    drain(engine)
    assert "ad5" not in model.peft_config
    ref = reference_ids(adapter_root / "ad5", [ids], NEW)[0]
    assert new.ids[: len(ref)] == ref and len(new.ids) == 20  # ignore_eos: the same ids up to EOS, then on
    assert len(running.ids) == 30 and running.finish == "length"
    with pytest.raises(ValueError, match="shape mismatch"):
        engine.load_adapter("bad", str(adapter_root / "other_base"))
    assert "bad" not in model.peft_config and sorted(engine.adapters) == ["ad1"]


def test_a_bare_base_model_gets_its_first_adapter_at_runtime(adapter_root):
    from lorakit.train.config import QuantizationConfig
    from lorakit.train.evaluate import load_base_model

    model, tok = load_base_model(str(TINY), "float32", QuantizationConfig())
    engine = Engine(model, tok)
    ids = tok(PROMPTS[1])["input_ids"]
    base = submit(engine, "b", BASE, ids)
    drain(engine)
    engine.load_adapter("ad4", str(adapter_root / "ad4"))
    both = [submit(engine, "b2", BASE, ids), submit(engine, "a", "ad4", ids)]
    drain(engine)
    assert both[0].ids == base.ids == reference_ids(None, [ids], NEW)[0]
    assert both[1].ids == reference_ids(adapter_root / "ad4", [ids], NEW)[0]


def test_a_failed_step_ends_its_requests_and_the_engine_goes_on(adapter_root):
    model, tok = load(adapter_root, ["ad1"])
    ids = tok(PROMPTS[0])["input_ids"]
    engine = Engine(model, tok)
    forward, failures = engine._forward, [RuntimeError("out of memory")]

    def flaky(*args, **kwargs):
        if failures:
            raise failures.pop()
        return forward(*args, **kwargs)

    engine._forward = flaky
    engine.start()
    try:
        first = submit(engine, "first", "ad1", ids)  # its prefill fails
        for _ in range(600):  # bounded: 60 s
            if first.finish:
                break
            time.sleep(0.1)
        second = submit(engine, "second", "ad1", ids)
        for _ in range(600):
            if second.finish:
                break
            time.sleep(0.1)
    finally:
        engine.stop()
    assert first.finish == "abort" and first.ids == []
    assert second.ids == reference_ids(adapter_root / "ad1", [ids], NEW)[0]
    assert engine.metrics["requests"][("ad1", "abort")] == 1
