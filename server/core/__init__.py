"""The serving core: a request's plan turned into the adapter that serves it (the planner), the adapter
cache and its folders on disk, compositions within their budget, the engine (vLLM or the reference),
the base model, the settings and the running server's parts."""
