"""The Ollama ``Modelfile`` and the export directory's README.

The Modelfile's TEMPLATE is derived from the model's own chat template by rendering probe
conversations with unique markers and cutting the renderings into role prefixes and
suffixes. The result is re-assembled in Python the way the Go template does it and compared
with the Jinja rendering of a test conversation: the report says whether they match.
Ollama adds BOS itself (from the GGUF), so the template leaves it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

U, A, V, S = "\x01USR\x01", "\x01AST\x01", "\x01USR2\x01", "\x01SYS\x01"

SAMPLING = {  # Google's recommended settings for Gemma 3; common defaults otherwise
    "gemma": {"temperature": 1.0, "top_k": 64, "top_p": 0.95},
    "default": {"temperature": 0.7, "top_k": 40, "top_p": 0.9},
}


@dataclass
class TemplateParts:
    user_pre: str
    user_suf: str
    asst_pre: str  # the generation prompt
    asst_suf: str
    sys_pre: str | None  # None: the template folds the system text into the first user turn
    sys_suf: str
    fold_sep: str = "\n\n"
    default_system: str | None = None  # what the template says when no system message is given
    preamble: str = ""  # constant text before the first message


def _render(renderer: Any, msgs: list[dict], gen: bool) -> str:
    return renderer.render_text(msgs, add_generation_prompt=gen)


def _after(text: str, marker: str) -> str:
    return text[text.index(marker) + len(marker):]


def derive_parts(renderer: Any, bos: str | None) -> TemplateParts:
    """Cut probe renderings into role prefixes / suffixes (ValueError if they do not line up)."""
    def r(msgs: list[dict], gen: bool) -> str:
        t = _render(renderer, msgs, gen)
        return t[len(bos):] if bos and t.startswith(bos) else t

    user, asst = {"role": "user", "content": U}, {"role": "assistant", "content": A}
    u_only, u_gen = r([user], False), r([user], True)
    ua = r([user, asst], False)
    uav = r([user, asst, {"role": "user", "content": V}], False)
    user_suf = _after(u_only, U)
    asst_pre = _after(u_gen, U)[len(user_suf):]
    mid = ua[ua.index(U) + len(U): ua.index(A)]
    if mid != user_suf + asst_pre:  # the header of a finished turn differs from the prompt's
        asst_pre = mid[len(user_suf):] if mid.startswith(user_suf) else mid
    asst_suf = _after(ua, A)
    user_pre = uav[uav.index(A) + len(A) + len(asst_suf): uav.index(V)]
    sys_pre, sys_suf = None, ""
    try:
        su = r([{"role": "system", "content": S}, user], False)
    except Exception:  # noqa: BLE001 - templates that refuse a system role
        su = ""
    if S in su and U in su and su.index(S) < su.index(U):
        before_user = su[: su.index(U)]
        if before_user.endswith(user_pre) and S in before_user[: len(before_user) - len(user_pre)]:
            head = before_user[: len(before_user) - len(user_pre)]
            sys_pre, sys_suf = head[: head.index(S)], _after(head, S)
    parts = TemplateParts(user_pre, user_suf, asst_pre, asst_suf, sys_pre, sys_suf)
    lead = u_only[: u_only.index(U)]
    if not lead.endswith(user_pre):
        raise ValueError("the first user turn is not introduced like the later ones")
    lead = lead[: len(lead) - len(user_pre)]
    if lead and sys_pre is not None and lead.startswith(sys_pre) and lead.endswith(sys_suf):
        parts.default_system = lead[len(sys_pre): len(lead) - len(sys_suf)]
    elif lead:
        parts.preamble = lead
    return parts


def assemble(parts: TemplateParts, messages: list[dict], gen: bool) -> str:
    """What :func:`go_template` renders for ``messages`` (without BOS), Ollama adding the
    Modelfile's SYSTEM (the template's default system prompt) when there is no system message."""
    if parts.default_system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": parts.default_system}, *messages]
    out, sys_text = [parts.preamble], ""
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "system":
            if parts.sys_pre is None:
                sys_text = m["content"]
            else:
                out.append(parts.sys_pre + m["content"] + parts.sys_suf)
        elif m["role"] == "user":
            content = m["content"]
            if sys_text:
                content, sys_text = sys_text + parts.fold_sep + content, ""
            out.append(parts.user_pre + content + parts.user_suf + (parts.asst_pre if last and gen else ""))
        else:
            out.append(parts.asst_pre + m["content"] + ("" if last else parts.asst_suf))
    return "".join(out)


def _go(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def go_template(parts: TemplateParts) -> str:
    """An Ollama (Go text/template) TEMPLATE over ``.Messages`` built from the parts."""
    if parts.sys_pre is None:
        sys_branch = '{{- if eq .Role "system" }}{{ $sys = .Content }}\n'
        fold = f'{{{{ if $sys }}}}{{{{ $sys }}}}{_go(parts.fold_sep)}{{{{ $sys = "" }}}}{{{{ end }}}}'
    else:
        sys_branch = f'{{{{- if eq .Role "system" }}}}{_go(parts.sys_pre)}{{{{ .Content }}}}{_go(parts.sys_suf)}\n'
        fold = ""
    return (
        '{{- $sys := "" }}' + _go(parts.preamble) + "\n"
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        + sys_branch
        + f'{{{{- else if eq .Role "user" }}}}{_go(parts.user_pre)}{fold}{{{{ .Content }}}}{_go(parts.user_suf)}'
          f"{{{{ if $last }}}}{_go(parts.asst_pre)}{{{{ end }}}}\n"
        + f'{{{{- else if eq .Role "assistant" }}}}{_go(parts.asst_pre)}{{{{ .Content }}}}'
          f"{{{{ if not $last }}}}{_go(parts.asst_suf)}{{{{ end }}}}\n"
        "{{- end }}\n"
        "{{- end }}"
    )


def check_parts(renderer: Any, parts: TemplateParts, bos: str | None) -> bool:
    """Whether the parts reproduce the chat template, with and without a system prompt."""
    convs = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Name a colour."}],
    ]
    for conv in convs:
        try:
            want = _render(renderer, conv, True)
        except Exception:  # noqa: BLE001
            return False
        if bos and want.startswith(bos):
            want = want[len(bos):]
        if assemble(parts, conv, True) != want:
            return False
    return True


def modelfile_text(gguf_name: str, template: str | None, end_tokens: list[str], family: str,
                   num_ctx: int, lora_note: str | None = None, system: str | None = None,
                   mmproj: str | None = None) -> str:
    s = SAMPLING["gemma" if family.startswith("gemma") else "default"]
    lines = ["# Made by macft export. Use: ollama create <name> -f Modelfile", f"FROM ./{gguf_name}", ""]
    if mmproj:
        lines[-1:] = [
            "# The vision projector is beside it. Ollama versions differ in how they take a separate",
            "# projector (a second FROM line works in some, not in others); llama.cpp and LM Studio",
            "# use it reliably (see README.md). To try it in Ollama, uncomment:",
            f"# FROM ./{mmproj}", ""]
    if template is not None:
        lines += [f'TEMPLATE """{template}"""', ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    for t in end_tokens:
        lines.append(f'PARAMETER stop "{t}"')
    lines += [f"PARAMETER temperature {s['temperature']}", f"PARAMETER top_k {s['top_k']}",
              f"PARAMETER top_p {s['top_p']}", f"PARAMETER num_ctx {num_ctx}"]
    if lora_note:
        lines += ["", lora_note]
    return "\n".join(lines) + "\n"


# What the README recommends: the smallest file within this KL divergence (to the 16-bit
# model, on the validation tokens; llama.cpp's own q4_k_m of LLaMA-3-8B measures 0.03) that
# still picks the reference's next token PICK_SAME_TOP of the time and ends its answers about
# as often (PICK_STOP of the reference's stop rate).
PICK_KL = 0.05
PICK_SAME_TOP = 0.90
PICK_STOP = 0.9


def pick_file(files: list[dict], outputs: list[str]) -> str | None:
    """The smallest published GGUF that meets the PICK_* figures (None: none measured does)."""
    def good(f: dict) -> bool:
        kl, top, stop, ref = f.get("kl_divergence"), f.get("same_top"), f.get("stop_rate"), f.get("ref_stop_rate")
        return (kl is not None and kl <= PICK_KL and top is not None and top >= PICK_SAME_TOP
                and (stop is None or not ref or stop >= PICK_STOP * ref))

    ok = [f for f in files if f["file"] in outputs and f.get("kind") != "lora" and good(f)]
    return min(ok, key=lambda f: f["size"])["file"] if ok else None


def readme_text(*, name: str, files: list[tuple[str, str, int]], main: str, lora: str | None,
                base_gguf: str | None, template_exact: bool, end_tokens: list[str],
                bin_dir: Path, report: str, verified: bool = True, mmproj: str | None = None,
                kl: dict[str, float | None] | None = None, imatrix: dict[str, bool] | None = None,
                pick: str | None = None) -> str:
    """``kl``: each GGUF's measured KL divergence to the 16-bit model; ``imatrix``: whether
    it was quantized with the importance matrix; ``pick``: the file the figures recommend."""
    from macft.ui import human_bytes

    kl, imatrix = kl or {}, imatrix or {}

    def _kl(f: str) -> str:
        x = kl.get(f)
        return "-" if x is None else f"{max(x, 0.0):.2g}" if x < 0.01 else f"{x:.3f}"

    def _imx(f: str) -> str:
        return {True: "yes", False: "no"}.get(imatrix.get(f), "-")  # type: ignore[arg-type]

    rows = "\n".join(f"| `{f}` | {k} | {human_bytes(sz)} | {_kl(f)} | {_imx(f)} |" for f, k, sz in files)
    stop_flags = " ".join(f'-r "{t}"' for t in end_tokens)
    lines = [
        f"# {name}: GGUF export",
        "",
        ("Made by `macft export`; every file below was checked with llama.cpp against the merged "
         f"Hugging Face model (figures in `{report}`)." if verified else
         "Made by `macft export --no-verify`: these files were NOT compared with the Hugging Face model."),
        "",
        "| file | type | size | KL divergence | importance matrix |",
        "|---|---|---|---|---|",
        rows,
        "",
        *(["**Which file:** the smaller the file, the further its answers drift from the fine-tune, and "
           "the KL divergence column measures that drift on your validation data (0 = identical; "
           "llama.cpp's own q4_k_m of Llama-3-8B measures about 0.03). Take the smallest file whose "
           f"drift you accept, here `{pick}` (the smallest within KL {PICK_KL} that picks the same next "
           f"token at least {PICK_SAME_TOP:.0%} of the time and ends its answers as often as the 16-bit "
           "model), or `q8_0` when memory allows.", ""] if pick else []),
        "## llama.cpp",
        "",
        "```sh",
        f"llama-cli -m {main}                 # chat, with the chat template stored in the GGUF",
        f"llama-server -m {main} --port 8080  # OpenAI-compatible server",
        f"llama-completion -m {main} -no-cnv -p 'Hello' -n 64 {stop_flags}",
        "```",
        "",
        f"macft's own llama.cpp build (`macft setup llama-cpp`) has `llama-completion` in `{bin_dir}`: "
        f"`{bin_dir}/llama-completion -m {main} -cnv`.",
        "",
    ]
    if mmproj:
        lines += [
            "### Images",
            "",
            f"`{mmproj}` is the model's vision projector (the fine-tune trained the text part only, so "
            "the image path is the base model's). Load it beside the text model:",
            "",
            "```sh",
            f"llama-mtmd-cli -m {main} --mmproj {mmproj} --image photo.jpg -p 'What is in this image?'",
            f"llama-server -m {main} --mmproj {mmproj} --port 8080   # images through the API",
            "```",
            "",
            f"LM Studio picks up the projector when `{mmproj}` is in the same folder as `{main}`.",
            "",
        ]
    lines += [
        "## Ollama",
        "",
        "```sh",
        f"ollama create {name} -f Modelfile",
        f"ollama run {name}",
        "```",
        "",
    ]
    if not template_exact:
        lines += ["The Modelfile's TEMPLATE was derived from the model's chat template but does not "
                  "reproduce it exactly for a conversation with a system prompt; check it before use.", ""]
    lines += [
        "## LM Studio",
        "",
        "```sh",
        f"lms import {main}",
        "```",
        "",
        f"or copy `{main}` to `~/.lmstudio/models/macft/{name}/`. LM Studio reads the chat template "
        "from the GGUF.",
        "",
    ]
    if lora:
        base = base_gguf or "BASE.gguf"
        where = (f"`{base_gguf}` (the base model converted by the same llama.cpp) is in this directory"
                 if base_gguf else
                 "`BASE.gguf` stands for the base model converted to a 16-bit GGUF (keep the one macft "
                 "made with --keep-intermediate, or run llama.cpp's convert_hf_to_gguf.py on the base)")
        lines += [
            "## The adapter alone (GGUF LoRA)",
            "",
            f"`{lora}` applies on top of the base model's GGUF; {where}:",
            "",
            "```sh",
            f"llama-cli -m {base} --lora {lora}",
            "```",
            "",
            f"Ollama: a Modelfile with `FROM <the base model>` and `ADAPTER ./{lora}`.",
            "",
        ]
    return "\n".join(lines)
