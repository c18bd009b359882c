"""Start-up hook for llama.cpp's converter subprocesses (macft puts this folder on their
PYTHONPATH; nothing else imports it).

The pinned llama.cpp's ``convert_hf_to_gguf.py`` reads a model's hyperparameters as
``AutoConfig.from_pretrained(dir).to_dict()`` and pins transformers 4.57 for it
(``requirements/requirements-convert_hf_to_gguf.txt``), whose ``to_dict()`` keeps a checkpoint's
older keys. Under transformers 5, ``to_dict()`` reports them upgraded instead (GPT-NeoX's
``rotary_pct`` / ``rotary_emb_base`` become ``rope_parameters``) and the converter stops with
``KeyError: 'rotary_pct'``. This hook adds back, into ``to_dict()``, the top-level keys the
model's own ``config.json`` holds and transformers 5 dropped: the converter then sees what its
pinned transformers would have shown it. Keys transformers reports are never changed.
"""

from __future__ import annotations


def _install() -> None:
    import json
    import os

    try:
        from transformers import AutoConfig
    except Exception:  # noqa: BLE001 - the converter reports a missing transformers itself
        return
    original = AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, path, *args, **kwargs):
        config = original(cls, path, *args, **kwargs)
        try:
            with open(os.path.join(os.fspath(path), "config.json"), encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, TypeError, ValueError):
            return config
        if not isinstance(raw, dict):
            return config
        to_dict = config.to_dict

        def to_dict_with_checkpoint_keys():
            d = to_dict()
            for k, v in raw.items():
                d.setdefault(k, v)
            return d

        config.to_dict = to_dict_with_checkpoint_keys
        return config

    AutoConfig.from_pretrained = classmethod(from_pretrained)


_install()
