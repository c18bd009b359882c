"""Command implementations, one module each, imported only when the command runs.

Commands beyond ``train`` and ``data inspect`` register their (light) argument
definitions here.
"""
