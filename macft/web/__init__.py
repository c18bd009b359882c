"""`macft chat --web`: a local chat page (Gradio) over the same model code as the terminal chat.

- :mod:`.worker`: the model stays on the main thread; answers stream out of it one at a time.
- :mod:`.conversation`: one turn (history trimming, end tokens, notices), Gradio-free.
- :mod:`.page`: the Gradio page.
- :mod:`.server`: host and port checks, serving, Ctrl-C.
- :mod:`.command`: the command itself (gradio is imported only there).
"""
