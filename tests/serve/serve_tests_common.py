"""A tokenizer stand-in for engine tests on the tiny random models (vocabulary of 128 ids)."""

from __future__ import annotations


class Tok:
    """Encodes space-separated integers and decodes ids back to them: enough to test text, stop strings and
    streaming without a real vocabulary."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(f" {i}" for i in ids)


def check_encoder_rows(deltas: dict, seed: int) -> None:
    """Two deltas on the tiny BERT (their classifier heads set to random values), classify and embed requests
    routed to either or to the base in one engine: each result equals the row run alone with its delta applied,
    and the deltas change the output."""
    import torch
    from conftest import tiny_bert

    import deltatune
    from deltatune.serve import DeltaStore, Engine
    from deltatune.serve.requests import EncodeRequest

    with torch.no_grad():
        for i, d in enumerate(deltas.values()):
            for t in d.heads["classifier"].values():
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed + i)))
    model = tiny_bert()
    store = DeltaStore(model, "base")
    for name, d in deltas.items():
        store.add(name, d)
    engine = Engine(model, Tok(), store)
    first, second = deltas
    rows = [([5, 6, 7, 8], first), ([9, 10], second), ([5, 6, 7, 8], None), ([9, 10, 11], first)]
    results = {}
    for i, (ids, name) in enumerate(rows):
        engine.submit_encode(EncodeRequest(ids, "classify", name, sink=lambda r, i=i: results.__setitem__(i, r)))
        engine.submit_encode(EncodeRequest(ids, "embed", name, sink=lambda r, i=i: results.__setitem__(i + 10, r)))
    engine.run_until_idle()
    for i, (ids, name) in enumerate(rows):
        alone = tiny_bert()
        if name:
            deltatune.apply_delta(alone, deltas[name])
        with torch.no_grad():
            out = alone(input_ids=torch.tensor([ids]), output_hidden_states=True)
        assert results[i].error is None and results[i + 10].error is None
        assert torch.allclose(torch.tensor(results[i].probs), out.logits.softmax(-1)[0], atol=1e-5)
        pooled = torch.nn.functional.normalize(out.hidden_states[-1].mean(1), dim=-1)[0]
        assert torch.allclose(torch.tensor(results[i + 10].embedding), pooled, atol=1e-5)
    assert not torch.allclose(torch.tensor(results[0].probs), torch.tensor(results[2].probs))
