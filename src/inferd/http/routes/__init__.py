"""One module per OpenAI endpoint family; each exposes ``router`` (a FastAPI APIRouter)."""
