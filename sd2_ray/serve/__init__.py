"""Serving: an OpenAI-compatible Ray Serve app over target + drafter with speculative decoding.

``config.ServeConfig`` (the ``sd2 serve`` flags), ``app.build_app`` / ``app.app_builder`` (the
Serve application), ``job.main`` (the CLI runner). Pure parts (``openai_schema``, ``core``,
``batching``, ``http``) never import Ray.
"""
