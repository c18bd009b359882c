"""cuda_backend.infer decodes with transformers' ``generate``: greedy answers are token for token
those of the hand-written loop it replaced (adapter on and off), and the end tokens, the token
limit, seeded sampling and closing the stream early still behave."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from cuda_backend.infer import TorchChatModel  # noqa: E402
from macft.inference import Sampling  # noqa: E402

PROMPTS = [[{"role": "user", "content": "Nya?"}],
           [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What do cats say?"}]]


@pytest.fixture(scope="module")
def chat(tiny_gemma, gemma_trained_adapter):
    """The tiny Gemma-3 with an adapter trained on the nya data: it answers, then ends its turn."""
    return TorchChatModel(tiny_gemma, gemma_trained_adapter, ["<end_of_turn>", "<eos>"])


def _reference(chat: TorchChatModel, prompt_ids: list[int], max_new: int) -> tuple[list[int], bool]:
    """The greedy loop cuda_backend/infer.py had before it used ``generate``."""
    ids, past, out = torch.tensor([prompt_ids]), None, []
    with torch.no_grad():
        for _ in range(max_new):
            res = chat.model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            t = int(torch.argmax(res.logits[0, -1].float()))
            if t in chat.stop:
                return out, True
            out.append(t)
            ids = torch.tensor([[t]])
    return out, False


def _answer(chat: TorchChatModel, prompt_ids: list[int], sampling: Sampling) -> tuple[list[int], bool]:
    pieces = list(chat.stream(prompt_ids, sampling))
    assert "".join(pieces) == chat.last.text
    return chat.last.token_ids, chat.last.stopped


@pytest.mark.parametrize("tuned", [True, False])
def test_greedy_tokens_are_those_of_the_hand_written_loop(chat, tuned):
    for messages in PROMPTS:
        p = chat.prompt(messages)
        with chat.adapters(tuned):
            ours = _answer(chat, p, Sampling(max_new_tokens=24))
            assert ours == _reference(chat, p, 24)
        ids, stopped = ours
        assert (stopped and len(ids) < 24 or len(ids) == 24) and chat.last.prompt_tokens == len(p)


def test_the_tuned_model_ends_its_turn_and_the_base_does_not(chat):
    p = chat.prompt(PROMPTS[0])
    on = _answer(chat, p, Sampling(max_new_tokens=40))
    with chat.adapters(False):
        off = _answer(chat, p, Sampling(max_new_tokens=40))
    assert on[1] and on[0] and chat.tokenizer.decode(on[0], skip_special_tokens=True).strip()
    assert off != on


def test_stops_on_an_end_token(chat):
    p = chat.prompt(PROMPTS[1])
    free, _ = _answer(chat, p, Sampling(max_new_tokens=16))
    assert len(free) >= 2
    end = free[len(free) // 2]  # make a token of the answer an end token: the answer stops before it
    saved = chat.stop
    chat.stop = saved | {end}
    try:
        ids, stopped = _answer(chat, p, Sampling(max_new_tokens=16))
        assert (ids, stopped) == (free[:free.index(end)], True)
        assert (ids, stopped) == _reference(chat, p, 16)
    finally:
        chat.stop = saved


def test_seeded_sampling_repeats_and_leaves_the_global_random_state(chat):
    p = chat.prompt(PROMPTS[0])
    s = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    state = torch.get_rng_state()
    first = _answer(chat, p, s)
    assert _answer(chat, p, s) == first and first[0]
    assert torch.equal(torch.get_rng_state(), state)
    assert _answer(chat, p, Sampling(max_new_tokens=0)) == ([], False)


def test_closing_the_stream_stops_the_generation(chat):
    p = chat.prompt(PROMPTS[0])
    stream = chat.stream(p, Sampling(max_new_tokens=200))
    next(stream, None)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "macft-generate"]
    assert _answer(chat, p, Sampling(max_new_tokens=4))[0] == _reference(chat, p, 4)[0]
