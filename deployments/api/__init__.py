"""The HTTP edge: FastAPI routers per API (`bfl`, `openai`), schemas, input images, auth, and one
table from the service's exceptions to HTTP answers (`errors`). `build_api` wires them."""
