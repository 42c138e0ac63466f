"""The provider abstraction: local responder, OpenAI-compatible servers, vLLM pools, routes.

The chat engine needs only ``build_route`` (``chat.providers.registry``) and the types in
``chat.providers.base``; the other modules are the parts a route is made of.
"""
