"""The application: the FastAPI app that assembles every room's routes, and the skill library's admin routes
(upload, list, show, download, delete, compositions)."""
