"""Named chat templates for models that ship none (rinna, Llama-2 / ELYZA, alpaca): masks cover
each reply and its end token, the run records the template, and chat uses it."""

from __future__ import annotations

import pytest

from macft.data.formats import Sample
from macft.data.templates import NAMED, resolve, suggest, template_text
from macft.errors import MacftError

CHAT = [{"role": "system", "content": "あなたは猫です。"},
        {"role": "user", "content": "こんにちは\nげんき？"},
        {"role": "assistant", "content": "げんきだにゃ"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4 にゃ"}]


@pytest.fixture(scope="module")
def plain_tok(tiny_gemma, tmp_path_factory):
    """The tiny model's SentencePiece tokenizer with its chat template removed (as rinna's,
    ELYZA's and GPT-2's tokenizers ship)."""
    from macft.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_gemma))
    tok.chat_template = None
    return tok


def trained_text(tok, r):
    """The trained tokens, decoded run by run (byte-fallback pieces only decode together)."""
    runs, cur = [], []
    for i, m in zip(r.ids, r.mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return "|".join(tok.decode(c) for c in runs + ([cur] if cur else []))


@pytest.mark.parametrize("name", ["rinna", "llama2", "alpaca", "fallback"])
def test_named_templates_train_the_replies_and_their_end(plain_tok, name):
    from macft.data.templates import renderer_for

    r = renderer_for(plain_tok, "assistant", name).render(Sample(messages=CHAT, text=None, where="t:1"))
    text = trained_text(plain_tok, r)
    assert "げんきだにゃ" in text and "4 にゃ" in text.replace("▁", " ")
    assert text.count(plain_tok.eos_token) == 2, text  # every reply learns to stop
    assert "こんにちは" not in text and "What" not in text and "猫" not in text  # prompts never trained
    assert len(r.turn_ends) == 2


def test_rinna_format_is_the_published_one(plain_tok):
    from macft.data.templates import renderer_for

    rend = renderer_for(plain_tok, "assistant", "rinna")
    prompt = rend.render_text(CHAT[:2], add_generation_prompt=True)
    assert prompt == "あなたは猫です。<NL>ユーザー: こんにちは<NL>げんき？<NL>システム: "
    full = rend.render_text(CHAT)
    assert full.startswith(prompt + "げんきだにゃ</s><NL>ユーザー: What is 2+2?<NL>".replace("</s>", plain_tok.eos_token))


def test_llama2_format_is_the_published_one(plain_tok):
    from macft.data.templates import renderer_for

    text = renderer_for(plain_tok, "assistant", "llama2").render_text(CHAT)
    bos, eos = plain_tok.bos_token, plain_tok.eos_token
    assert text == (f"{bos}[INST] <<SYS>>\nあなたは猫です。\n<</SYS>>\n\nこんにちは\nげんき？ [/INST] げんきだにゃ {eos}"
                    f"{bos}[INST] What is 2+2? [/INST] 4 にゃ {eos}")


def test_choice_resolution_and_suggestions(plain_tok, tmp_path):
    assert resolve(None, plain_tok)[0] == "fallback"
    assert resolve("llama2", plain_tok) == ("llama2", template_text("llama2"))
    f = tmp_path / "mine.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert resolve(str(f), plain_tok)[1] == f.read_text()
    with pytest.raises(MacftError, match="neither a known template nor a file"):
        resolve("vicuna", plain_tok)
    with pytest.raises(MacftError, match="no such file"):
        resolve(str(tmp_path / "missing.jinja"), plain_tok)
    assert suggest("rinna/japanese-gpt-neox-3.6b-instruction-sft", "gpt_neox", plain_tok) == "rinna"
    assert suggest("elyza/ELYZA-japanese-Llama-2-7b-instruct", "llama", plain_tok) == "llama2"
    # a tokenizer that knows Gemma's turn tokens but lost its template (a community fine-tune)
    assert suggest("someone/my-finetune", "gemma3_text", plain_tok) == "gemma3"

    class Bare:
        chat_template = None

        def get_vocab(self):
            return {"hello": 0}

    assert suggest("openai-community/gpt2", "gpt2", Bare()) is None
    assert set(NAMED) >= {"rinna", "llama2", "alpaca", "chatml", "gemma3", "fallback"}


def test_a_run_records_its_template_and_chat_uses_it(plain_tok):
    from macft.chat_session import run_chat_template

    assert run_chat_template({"chat_template": "rinna", "chat_template_text": template_text("rinna")}) \
        == template_text("rinna")
    assert run_chat_template({"chat_template": "model", "chat_template_text": None}) is None
    # runs written before named templates existed
    assert run_chat_template({"chat_template": "fallback", "fallback_template": "X"}) == "X"


def test_qwen3_thinking_template_trains_non_thinking_turns(tmp_path):
    """Data without reasoning on Qwen3: never loss on template-inserted think tags, the last turn
    of a multi-turn row trained like the others, and the exported template defaults to the
    non-thinking mode training used."""
    from checkpoints.layouts import build
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from macft.data.render import NO_THINK_DEFAULT
    from macft.data.templates import renderer_for
    from macft.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(build("qwen3", tmp_path / "qwen3")))
    rend = renderer_for(tok, "assistant", None)
    assert rend.thinking and rend.template.startswith(NO_THINK_DEFAULT)
    one = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "にゃーん！"}]
    two = one + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "にゃーん！"}]
    for msgs, n in ((one, 1), (two, 2)):
        examples = rend.render_all(Sample(messages=msgs, text=None, where="t:1"))
        assert len(examples) == n
        for r in examples:
            assert trained_text(tok, r) == "にゃーん！<|im_end|>"
            assert "<think>\n\n</think>\n\n" in tok.decode(r.ids)  # in the prompt, untrained
    prompt = rend.render_text(one[:1], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # what llama.cpp / Ollama / LM Studio render from the exported template, passing no kwargs
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    plain = env.from_string(rend.template).render(messages=one[:1], add_generation_prompt=True)
    assert plain == prompt
    thinking = env.from_string(rend.template).render(messages=one[:1], add_generation_prompt=True,
                                                     enable_thinking=True)
    assert thinking.endswith("<|im_start|>assistant\n")  # thinking stays available when asked for
