"""The OpenAI front: a request's body parsed with vLLM's protocol model, the endpoints Mosaic serves and how
each is answered (vLLM's serving layer, or the reference engine's subset), and the response with Mosaic's
plan in it."""
