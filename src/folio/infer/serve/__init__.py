"""`folio serve`: a local web page (runs, live loss curves, playground) and an OpenAI-compatible
API over the models of run directories, from one process.

runs.py finds runs and keeps models loaded; engine.py decodes requests off the event loop;
api.py checks requests and shapes OpenAI responses; app.py wires the routes.
"""
