"""Render a sample to token ids plus a loss mask, through the model's own chat template.

``render(sample)`` returns ``Rendered(ids, mask, turn_ends)``:

- ``ids``: the tokens exactly as ``tokenizer.apply_chat_template`` would produce them
  (the template emits BOS; nothing is added twice).
- ``mask[j] == 1`` means token ``j`` is a training target (predicted from token
  ``j - 1``). ``mask[0]`` is always 0. By default the mask covers every assistant
  reply *including* the template's turn terminator (``<end_of_turn>`` for Gemma,
  ``<|im_end|>`` for ChatML) and EOS where the template emits it, so the model
  learns to stop. Role headers, user and system text are never trained; nor is the
  whitespace a template puts after a terminator.
- ``turn_ends``: for each assistant turn, the index just past its last trained
  token; truncation cuts there to keep whole turns.

How the assistant spans are found: for assistant turn ``i`` the template is
rendered for ``messages[:i]`` with the generation prompt and for
``messages[:i+1]``; the characters between the two are the reply and its
terminator. Templates that render earlier turns differently once more turns
follow (some "thinking" templates) fall back to locating each reply's text in
the full rendering and extending it over a directly following end token.
Character spans become token masks through the fast tokenizer's offsets.

Templates without a system role: the system text is folded into the first user
turn (``system + "\\n\\n" + user``), as Gemma's own template does.

Tokenizers without a chat template use a named template given with ``--chat-template``
(:mod:`macft.data.templates`: rinna, llama2, alpaca, ...) or else :data:`FALLBACK_TEMPLATE`,
a plain ``### User`` / ``### Assistant`` format whose replies end with EOS; the resolved
config records the template and export writes it into the exported model.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError, MacftError
from .formats import Sample

FALLBACK_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

# Turn terminators of common templates; the ones a tokenizer has are end tokens.
KNOWN_END_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>",
                    "</s>", "<|end_of_text|>", "<eos>")


# Put in front of a thinking-mode template: without an explicit enable_thinking, render the
# non-thinking form training used (llama.cpp, Ollama and LM Studio pass no kwargs by default).
NO_THINK_DEFAULT = ("{%- if enable_thinking is not defined %}{%- set enable_thinking = false %}"
                    "{%- endif %}\n")


def is_thinking_template(template: str) -> bool:
    """A template with a switchable reasoning block (Qwen3's ``enable_thinking``)."""
    return "enable_thinking" in template and "<think>" in template


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]
    turn_ends: list[int] = field(default_factory=list)

    @property
    def trained(self) -> int:
        return int(sum(self.mask))


class Renderer:
    """Turns samples into (ids, mask) with one tokenizer and one chat template."""

    def __init__(self, tokenizer: Any, loss_on: str = "assistant", template: str | None = None,
                 template_name: str | None = None):
        """``template``: a chat template to use instead of the tokenizer's own (a named one
        from :mod:`macft.data.templates`, or a user's file); without one, the tokenizer's own,
        or :data:`FALLBACK_TEMPLATE` when it has none."""
        self.tok = tokenizer
        self.loss_on = loss_on
        if template is None and not getattr(tokenizer, "chat_template", None):
            template, template_name = FALLBACK_TEMPLATE, "fallback"
        own = template if template is not None else tokenizer.chat_template
        # Thinking-mode templates (Qwen3): data without reasoning is rendered as the template
        # renders a non-thinking turn (enable_thinking=False: an empty <think></think> block in
        # the prompt, never trained). The template that goes into the run, the GGUF and the
        # Modelfile defaults to that mode, so inference matches training.
        self.thinking = isinstance(own, str) and is_thinking_template(own)
        if self.thinking and not own.startswith(NO_THINK_DEFAULT):
            template, template_name = NO_THINK_DEFAULT + own, template_name or "model (non-thinking)"
        self.template = template
        self.template_name = template_name or ("model" if template is None else "custom")
        self.uses_fallback_template = self.template_name == "fallback"
        self._fold_system = False
        self._has_offsets = self._check_offsets()

    # -- template ---------------------------------------------------------------

    def render_text(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        msgs = self._fold(messages) if self._fold_system else messages
        extra = {"enable_thinking": False} if self.thinking else {}
        try:
            return self.tok.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                chat_template=self.template, **extra)
        except Exception as e:  # jinja2 TemplateError, raise_exception() in templates
            if (not self._fold_system and msgs and msgs[0]["role"] == "system"
                    and "system" in str(e).lower()):
                self._fold_system = True
                return self.render_text(messages, add_generation_prompt)
            raise

    @staticmethod
    def _fold(messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if not messages or messages[0]["role"] != "system":
            return messages
        sys_text, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
        for m in rest:
            if m["role"] == "user":
                m["content"] = f"{sys_text}\n\n{m['content']}"
                break
        else:
            rest.insert(0, {"role": "user", "content": sys_text})
        return rest

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a prompt ready for generation (ends with the assistant header)."""
        text = self.render_text(messages, add_generation_prompt=True)
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def end_tokens(self) -> list[str]:
        """Token strings that end an assistant turn (terminator and EOS), for stopping."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ZQX"}]
        out: list[str] = []
        try:
            text = self.render_text(probe)
            tail = text[text.rindex("ZQX") + 3:]
        except Exception:  # noqa: BLE001 - a template that cannot render a probe
            tail = ""
        vocab = self.tok.get_vocab()
        for t in KNOWN_END_TOKENS:
            if t in tail and t in vocab:
                out.append(t)
        eos = self.tok.eos_token
        if eos and eos not in out:
            out.append(eos)
        return out

    # -- rendering ----------------------------------------------------------------

    def render_all(self, sample: Sample) -> list[Rendered]:
        """The training examples of one sample: one, except for thinking-mode templates, where a
        conversation with several replies becomes one example per reply, each rendered as the
        template renders that turn at inference (the history in its plain form, then the
        non-thinking generation prompt): the template renders earlier turns differently, and
        training them in that form would teach the model to skip its <think> block."""
        if not (self.thinking and sample.is_chat and self.loss_on != "all"):
            return [self.render(sample)]
        msgs = sample.messages or []
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if len(turns) <= 1 or self.loss_on == "last_assistant":
            return [self.render(sample)]
        # each example trains its last reply only: the earlier ones have examples of their own
        return [self.render(Sample(msgs[: i + 1], None, sample.where), last_only=True) for i in turns]

    def render(self, sample: Sample, last_only: bool = False) -> Rendered:
        try:
            if sample.is_chat:
                return self._render_chat(sample.messages, last_only)  # type: ignore[arg-type]
            return self._render_text(sample.text or "")
        except DataError:
            raise
        except MacftError:
            raise
        except Exception as e:  # noqa: BLE001 - jinja / tokenizer failures, with location
            raise DataError(sample.where, f"the chat template could not render this row: {e}",
                            field="messages",
                            hint="Check the order of the roles (most templates need user/assistant "
                                 "turns to alternate, starting with user).") from None

    def _render_text(self, text: str) -> Rendered:
        ids = list(self.tok(text, add_special_tokens=True)["input_ids"])
        eos = self.tok.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        mask = [0] + [1] * (len(ids) - 1)
        return Rendered(ids, mask, [len(ids)])

    def _render_chat(self, messages: list[dict[str, str]], last_only: bool = False) -> Rendered:
        full = self.render_text(messages)
        spans = self._assistant_spans(messages, full)
        if self.loss_on == "last_assistant" or last_only:
            spans = spans[-1:]
        enc = self.tok(full, add_special_tokens=False,
                       return_offsets_mapping=self._has_offsets)
        ids = list(enc["input_ids"])
        if self._has_offsets:
            offsets = [tuple(o) for o in enc["offset_mapping"]]
        else:
            offsets = self._offsets_by_decoding(ids)
        mask = [0] * len(ids)
        turn_ends: list[int] = []
        starts = [o[0] for o in offsets]
        for s, e in spans:
            # tokens overlapping [s, e): a token straddling the boundary is trained
            j0 = max(bisect.bisect_left(starts, s) - 1, 0)
            j = j0
            last = -1
            while j < len(ids) and offsets[j][0] < e:
                a, b = offsets[j]
                if b > s or (a == b and a >= s):  # zero-width specials inside the span
                    mask[j] = 1
                    last = j
                j += 1
            if last >= 0:
                turn_ends.append(last + 1)
        if self.loss_on == "all":
            mask = [1] * len(ids)
        if ids:
            mask[0] = 0
        return Rendered(ids, mask, turn_ends)

    def _assistant_spans(self, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        ok = True
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render_text(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render_text(messages[: i + 1])
            if not (upto.startswith(prefix) and full.startswith(upto)):
                ok = False
                break
            end = len(upto.rstrip())
            spans.append((len(prefix), max(end, len(prefix))))
        if ok:
            return spans
        return self._spans_by_search(messages, full)

    def _spans_by_search(self, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
        ends = self.end_tokens()
        spans, pos = [], 0
        for m in messages:
            idx = full.find(m["content"], pos) if m["content"] else -1
            if idx < 0:
                raise MacftError(
                    "The chat template renders turns in a way macft cannot align with the "
                    f"messages (could not find a {m['role']} turn's text in the rendering).",
                    "Pass --format text with pre-rendered text, or use a model whose chat "
                    "template renders each turn verbatim.")
            end = idx + len(m["content"])
            if m["role"] == "assistant":
                rest = full[end:]
                stripped = rest.lstrip(" ")
                for t in ends:
                    if stripped.startswith(t):
                        end += (len(rest) - len(stripped)) + len(t)
                        break
                spans.append((idx, end))
            pos = end
        return spans

    # -- offsets --------------------------------------------------------------------

    def _check_offsets(self) -> bool:
        try:
            enc = self.tok("ab", add_special_tokens=False, return_offsets_mapping=True)
            return "offset_mapping" in enc
        except Exception:  # noqa: BLE001 - slow tokenizers raise NotImplementedError
            return False

    def _offsets_by_decoding(self, ids: list[int]) -> list[tuple[int, int]]:
        """Character offsets for slow tokenizers: decode growing prefixes."""
        offsets, prev = [], 0
        for j in range(len(ids)):
            cur = len(self.tok.decode(ids[: j + 1], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False))
            offsets.append((prev, cur))
            prev = cur
        return offsets
