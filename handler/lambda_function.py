"""AWS Lambda entry point: the FastAPI app behind Mangum (no lifespan on Lambda)."""

from mangum import Mangum

from handler.app import create_app

app = create_app()
handler = Mangum(app, lifespan="off")
