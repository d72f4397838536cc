"""The server room: the HTTP edge, the OpenAI front, the serving core, background jobs, Ray Serve and the CLI."""
